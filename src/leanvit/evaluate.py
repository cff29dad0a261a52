"""Top-1, GMACs per image, images/s and fidelity to the dense model of several runners over one
pass of a data set.

Fidelity is measured on the same images as the reference runner ("dense"): ``agreement`` (% of
images with the same top-1 class), ``kl_to_dense`` (mean KL(dense || method) of the softmax
outputs, nats), and ``delta_top1`` with ``delta_top1_ci95``, a paired 95% interval: the normal
interval of the mean of the per-image differences d_i = correct_method,i - correct_dense,i,
delta +- 1.96 sd(d)/sqrt(n). On the same images it is far narrower than two independent
intervals, and KL and agreement separate methods that top-1 cannot.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .measure import macs_per_image
from .methods.base import leaves_no_trace
from .models import load_model
from .options import Spec
from .runtime import LeanViT, adapt


@dataclass
class EvalResult:
    method: str
    top1: float  # percent
    gmacs: float  # per image, mean over the evaluated images
    images_per_second: float  # model forward only (data loading excluded), at the loader's batch size
    n_images: int
    skipped: int  # unreadable images, reported by path while loading
    agreement: Optional[float] = None  # % of images whose top-1 class equals the reference's
    kl_to_dense: Optional[float] = None  # mean KL(reference || this) in nats
    delta_top1: Optional[float] = None  # top-1 minus the reference's, points
    delta_top1_ci95: Optional[List[float]] = None  # paired 95% interval of delta_top1
    speedup: Optional[float] = None  # reference's forward time / this runner's, over all batches
    speedup_iqr: Optional[List[float]] = None  # quartiles of the per-batch speedups: the spread
    skipped_paths: List[str] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def significant(self) -> bool:
        """The paired interval of the top-1 difference excludes 0."""
        lo, hi = self.delta_top1_ci95 or (0.0, 0.0)
        return lo > 0 or hi < 0

    def to_dict(self) -> dict:
        return asdict(self)


def paired_delta(correct: Tensor, reference: Tensor, z: float = 1.96) -> Tuple[float, List[float]]:
    """Top-1 difference in points and its paired normal interval, from per-image 0/1 correctness."""
    d = correct.double() - reference.double()
    delta = 100.0 * float(d.mean())
    half = 100.0 * z * float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
    return delta, [delta - half, delta + half]


def kl_per_image(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(reference) || softmax(logits)) per image, in nats."""
    ref = F.log_softmax(reference_logits.double(), dim=-1)
    return F.kl_div(F.log_softmax(logits.double(), dim=-1), ref, log_target=True, reduction="none").sum(-1)


def _quartiles(values: List[float]) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return [float(t.quantile(0.25)), float(t.quantile(0.75))]


def evaluate(runners: Dict[str, LeanViT], loader: Iterable, desc: str = "eval", reference: str = "dense",
             seed: int = 0) -> Dict[str, EvalResult]:
    """Run every runner on each batch of ``loader`` (one pass over the data for all of them).

    The runners run in a seeded random order on every batch, so that none is favoured by always
    running first or last (caches, allocator, CPU clock), after one untimed warm-up forward each. If ``reference`` names a runner, every
    result carries its fidelity and speedup against it.
    """
    names = list(runners)
    stats = {k: dict(correct=[], macs=0.0, seconds=[], agree=0, kl=0.0) for k in names}
    n, skipped = 0, []
    order = random.Random(seed)
    for r in runners.values():
        r.eval()
        r.method.reset_stats()
    bar = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True)
    for batch in bar:
        skipped.extend(batch.skipped)
        if batch.images.shape[0] == 0:
            continue
        images, labels = batch.images, batch.labels
        if n == 0:  # warm-up, untimed: the first forward pays one-time costs (kernels, allocator)
            for runner in runners.values():
                with torch.inference_mode(), leaves_no_trace(runner.method):
                    runner(images)
        n += images.shape[0]
        logits = {}
        for name in order.sample(names, len(names)):
            runner = runners[name]
            with torch.inference_mode(), runner.tracing() as trace:
                t0 = time.perf_counter()
                logits[name] = runner(images)
                stats[name]["seconds"].append(time.perf_counter() - t0)
            stats[name]["correct"].append(logits[name].argmax(dim=1) == labels)
            stats[name]["macs"] += float(macs_per_image(runner, trace, images).sum())
        if reference in logits:
            ref = logits[reference]
            for name in names:
                stats[name]["agree"] += int((logits[name].argmax(1) == ref.argmax(1)).sum())
                stats[name]["kl"] += float(kl_per_image(ref, logits[name]).sum())
        bar.set_postfix({k: f"{100 * sum(int(c.sum()) for c in s['correct']) / n:.1f}%" for k, s in stats.items()})
    if n == 0:
        raise ValueError(f"no readable images to evaluate ({len(skipped)} unreadable)")
    results = {}
    for name, runner in runners.items():
        s = stats[name]
        correct = torch.cat(s["correct"])
        extra = dict(runner.method.stats())
        fidelity = {}
        if reference in stats:
            ref = stats[reference]
            delta, ci = paired_delta(correct, torch.cat(ref["correct"]))
            fidelity = dict(agreement=100.0 * s["agree"] / n, kl_to_dense=s["kl"] / n, delta_top1=delta,
                            delta_top1_ci95=ci, speedup=sum(ref["seconds"]) / sum(s["seconds"]),
                            speedup_iqr=_quartiles([r / t for r, t in zip(ref["seconds"], s["seconds"])]))
        results[name] = EvalResult(
            method=name, top1=100.0 * float(correct.double().mean()), gmacs=s["macs"] / n / 1e9,
            images_per_second=n / sum(s["seconds"]), n_images=n, skipped=len(skipped),
            skipped_paths=list(skipped), extra=extra, **fidelity)
    return results


def adapt_spec(model, spec: Spec, models: Optional[dict] = None) -> LeanViT:
    """``spec``'s method on ``model``, or on the shipped model the spec names (loaded once into
    ``models``, a cache by name)."""
    if spec.model is not None:
        models = {} if models is None else models
        if spec.model not in models:
            models[spec.model] = load_model(spec.model)
        model = models[spec.model]
    return adapt(model, spec.method, **spec.options)


def sweep(model, loader, specs: list, desc: str = "sweep") -> dict:
    """Dense and every :class:`~leanvit.options.Spec` in one pass over ``loader``.

    Returns ``{"dense": EvalResult-dict, "rows": [dict(method, label, options, ...EvalResult)]}``
    (and ``model`` in the rows of specs that run on a model of their own).
    """
    from .provenance import method_weights, model_weights
    runners, models = {"dense": adapt(model, "none")}, {}
    for spec in specs:
        runners[f"{spec.method} {spec.label}"] = adapt_spec(model, spec, models)
    results = evaluate(runners, loader, desc=desc)
    rows = []
    for spec in specs:
        r = results[f"{spec.method} {spec.label}"].to_dict()
        r.pop("skipped_paths")
        rows.append(dict(r, method=spec.method, label=spec.label, options=spec.options,
                         method_weights=method_weights(spec.method, spec.options),
                         **({"model": spec.model, "model_weights": model_weights(spec.model)} if spec.model else {})))
    return dict(dense=results["dense"].to_dict(), rows=rows)
