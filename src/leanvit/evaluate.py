"""Top-1, GMACs per image and images/s of several runners over one pass of a data set."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List

import torch
from tqdm import tqdm

from .flops import macs_per_image
from .runtime import LeanViT


@dataclass
class EvalResult:
    method: str
    top1: float  # percent
    gmacs: float  # per image, mean over the evaluated images
    images_per_second: float  # model forward only (data loading excluded), at the loader's batch size
    n_images: int
    skipped: int  # unreadable images, reported by path while loading
    skipped_paths: List[str] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(runners: Dict[str, LeanViT], loader: Iterable, desc: str = "eval") -> Dict[str, EvalResult]:
    """Run every runner on each batch of ``loader`` (one pass over the data for all of them)."""
    stats = {k: dict(correct=0, macs=0.0, seconds=0.0) for k in runners}
    n, skipped = 0, []
    for r in runners.values():
        r.eval()
        if hasattr(r.method, "reset_stats"):
            r.method.reset_stats()
    bar = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True)
    for batch in bar:
        skipped.extend(batch.skipped)
        if batch.images.shape[0] == 0:
            continue
        images, labels = batch.images, batch.labels
        n += images.shape[0]
        for name, runner in runners.items():
            with torch.inference_mode(), runner.tracing() as trace:
                t0 = time.perf_counter()
                logits = runner(images)
                stats[name]["seconds"] += time.perf_counter() - t0
            stats[name]["correct"] += int((logits.argmax(dim=1) == labels).sum())
            stats[name]["macs"] += float(macs_per_image(runner, trace, images).sum())
        bar.set_postfix({k: f"{100 * s['correct'] / n:.1f}%" for k, s in stats.items()})
    if n == 0:
        raise ValueError(f"no readable images to evaluate ({len(skipped)} unreadable)")
    results = {}
    for name, runner in runners.items():
        s = stats[name]
        extra = {}
        if hasattr(runner.method, "prune_fraction"):
            extra["prune_fraction_per_layer"] = runner.method.prune_fraction()
        results[name] = EvalResult(
            method=name, top1=100.0 * s["correct"] / n, gmacs=s["macs"] / n / 1e9,
            images_per_second=n / s["seconds"], n_images=n, skipped=len(skipped),
            skipped_paths=list(skipped), extra=extra)
    return results


def sweep(model, loader, specs: list, desc: str = "sweep") -> dict:
    """Dense and every :class:`~leanvit.demo.Spec` in one pass over ``loader``.

    Returns ``{"dense": EvalResult-dict, "rows": [dict(method, label, options, ...EvalResult)]}``
    (and ``model`` in the rows of specs that run on a model of their own).
    """
    import leanvit
    from .demo import adapt_spec
    runners, models = {"dense": leanvit.adapt(model, "none")}, {}
    for spec in specs:
        runners[f"{spec.method} {spec.label}"] = adapt_spec(model, spec, models)
    results = evaluate(runners, loader, desc=desc)
    rows = []
    for spec in specs:
        r = results[f"{spec.method} {spec.label}"].to_dict()
        r.pop("skipped_paths")
        rows.append(dict(r, method=spec.method, label=spec.label, options=spec.options,
                         **({"model": spec.model} if spec.model else {})))
    return dict(dense=results["dense"].to_dict(), rows=rows)
