"""Top-1, GMACs per image, images/s and fidelity to the dense model of several runners over one
pass of a data set.

Fidelity is measured on the same images as the reference runner ("dense"): ``agreement`` (% of
images with the same top-1 class), ``kl_to_dense`` (mean KL(dense || method) of the softmax
outputs, nats) with ``kl_to_dense_ci95``, the normal 95% interval of that mean over the images
(kl +- 1.96 sd(kl_i)/sqrt(n): it ranks methods whose intervals do not overlap), and ``delta_top1``
with ``delta_top1_ci95``, a paired 95% interval: the normal interval of the mean of the per-image
differences d_i = correct_method,i - correct_dense,i, delta +- 1.96 sd(d)/sqrt(n). On the same
images it is far narrower than two independent intervals, and KL and agreement separate methods
that top-1 cannot.

A method's *random floor* (``controls``) is the control for its choice of tokens: on every batch,
random tokens kept at exactly the per-image token counts (and channel widths) the method ran
(:class:`leanvit.bench.Floor`, replaying the method's trace of that batch). The method's
``vs_random_floor`` holds the paired differences method - floor of KL, agreement and top-1, with
the same paired normal intervals: a negative KL difference whose interval excludes 0 means the
method's choice of tokens beats random at its own counts. Its *shuffled floor* (``shuffled``) deals
the batch's per-image counts and widths to its images in a random order, with random tokens
(``vs_shuffled_floor``): the control for which image gets which budget, and the only control of a
method that changes widths but no tokens (PRANCE's channel-only selector).
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .device import all_gather, all_sum, autocast, is_main, module_device
from .measure import image_configurations, macs_per_image
from .methods.base import leaves_no_trace
from .models import load_fitting, load_model, read_state_dict
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
    decision_gmacs: float = 0.0  # of gmacs: the method's own decision networks (an actor, a selector)
    configurations: Optional[float] = None  # with evaluate's group: distinct configurations per group
    agreement: Optional[float] = None  # % of images whose top-1 class equals the reference's
    kl_to_dense: Optional[float] = None  # mean KL(reference || this) in nats
    kl_to_dense_ci95: Optional[List[float]] = None  # normal 95% interval of that mean over the images
    delta_top1: Optional[float] = None  # top-1 minus the reference's, points
    delta_top1_ci95: Optional[List[float]] = None  # paired 95% interval of delta_top1
    speedup: Optional[float] = None  # reference's forward time / this runner's, over all batches
    speedup_iqr: Optional[List[float]] = None  # quartiles of the per-batch speedups: the spread
    # paired differences to the random floor at this method's per-image counts (see the module doc)
    vs_random_floor: Optional[Dict[str, object]] = None
    vs_shuffled_floor: Optional[Dict[str, object]] = None  # the same to the shuffled floor
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
    d = correct.long() - reference.long()
    return _mean_interval(int(d.sum()), int((d * d).sum()), d.numel(), z)


def paired_interval(d: Tensor, z: float = 1.96) -> Tuple[float, List[float]]:
    """Mean of per-image differences ``d`` and its paired normal 95% interval."""
    d = d.double()
    return _mean_interval(float(d.sum()), float((d * d).sum()), d.numel(), z, scale=1.0)


def _versus(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> Dict[str, object]:
    """Paired differences a - b over the same images: KL (nats), agreement and top-1 (points)."""
    out = {}
    for key, scale in (("kl_to_dense", 1.0), ("agreement", 100.0), ("top1", 100.0)):
        mean, ci = paired_interval(scale * (a[key].double() - b[key].double()))
        out[key] = mean
        out[key + "_ci95"] = ci
    return out


def _mean_interval(sum_x: float, sum_x2: float, n: int, z: float = 1.96,
                   scale: float = 100.0) -> Tuple[float, List[float]]:
    """``scale`` x the mean of n values and its normal interval, from their sum and the sum of their
    squares (for :func:`paired_delta` the per-image differences, integers for 0/1 correctness, so
    that processes can add theirs up exactly)."""
    mean = sum_x / n
    sd = math.sqrt(max(sum_x2 - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0
    delta, half = scale * mean, scale * z * sd / math.sqrt(n)
    return delta, [delta - half, delta + half]


def kl_per_image(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(reference) || softmax(logits)) per image, in nats."""
    ref = F.log_softmax(reference_logits.double(), dim=-1)
    return F.kl_div(F.log_softmax(logits.double(), dim=-1), ref, log_target=True, reduction="none").sum(-1)


def _quartiles(values: List[float]) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return [float(t.quantile(0.25)), float(t.quantile(0.75))]


# what evaluate adds up over images and processes; "decision": MACs of a method's own networks,
# "configs"/"groups": distinct per-image configurations and the groups of images they were counted in
SUMS = ("correct", "d", "d2", "macs", "decision", "agree", "kl", "kl2", "time", "configs", "groups")
PER_IMAGE = ("kl_to_dense", "agreement", "top1")  # kept image by image for the paired differences to the floors


def evaluate(runners: Dict[str, LeanViT], loader: Iterable, desc: Optional[str] = "eval",
             reference: Optional[str] = "dense",
             seed: int = 0, amp: str = "off", controls: Iterable[str] = (), shuffled: bool = False,
             warmup: bool = True, group: Optional[int] = None) -> Dict[str, EvalResult]:
    """Run every runner on each batch of ``loader`` (one pass over the data for all of them).

    The runners run in a seeded random order on every batch, so that none is favoured by always
    running first or last (caches, allocator, CPU clock), after one untimed warm-up forward each
    (``warmup=False``: none, for evaluations whose times nobody reads). If ``reference`` names a
    runner, every result carries its fidelity and speedup against it. The batches go to the
    runners' device; ``amp``: the forwards' precision (:func:`leanvit.device.autocast`);
    ``desc=None``: no progress bar.

    Under torchrun each process evaluates the loader it is given (its shard: ``make_loader(...,
    shard=(rank, world))``) and the counts, MACs and fidelity sums are added up over the
    processes: every process returns the results of the whole data set (timing: images/s of one
    process, speedups over all batches).

    ``controls``: runners that also get their random floor, as ``"<name> floor"`` in the results
    (run right after the runner, on the same images), and ``vs_random_floor`` (needs ``reference``);
    ``shuffled``: each also gets its shuffled floor, ``"<name> shuffled floor"`` and ``vs_shuffled_floor``.
    ``group``: each result's ``configurations`` is the mean number of distinct per-image
    configurations (the heads, MLP width and token count of every block) in consecutive groups of
    ``group`` images of each batch (the last, smaller group of a batch included).
    """
    tally = _Tally(runners, reference, controls, shuffled, group)
    device = module_device(next(iter(runners.values())))
    skipped, order = [], random.Random(seed)
    for r in runners.values():
        r.eval()
        r.method.reset_stats()
    bar = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=desc is None or not is_main())
    with autocast(device, amp):
        for batch in bar:
            skipped.extend(batch.skipped)
            if batch.images.shape[0] == 0:
                continue
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device, non_blocking=True)
            if warmup:  # untimed: the first forward pays one-time costs (kernels, allocator)
                for runner in runners.values():
                    with torch.inference_mode(), leaves_no_trace(runner.method):
                        runner(images)
                warmup = False
            tally.batch(images, labels, order)
            bar.set_postfix({k: f"{100 * s['correct'] / tally.n:.1f}%" for k, s in tally.stats.items()})
    return tally.results(skipped)


class _Tally:
    """What :func:`evaluate` adds up, runner by runner, batch by batch, and its results."""

    def __init__(self, runners: Dict[str, LeanViT], reference: Optional[str], controls: Iterable[str], shuffled: bool,
                 group: Optional[int]):
        self.controls = [c for c in controls if c != reference]
        unknown = [c for c in self.controls if c not in runners]
        if unknown:
            raise ValueError(f"controls name no runner: {unknown}")
        self.runners, self.reference, self.group = runners, reference, group
        self.floors = ("floor", "shuffled floor") if shuffled else ("floor",)
        self.names = list(runners)
        self.all_names = self.names + [f"{c} {f}" for c in self.controls for f in self.floors]
        # per runner: the SUMS over the images (correct, d = correct - reference's correct, d^2, MACs,
        # agreement, KL) and batches (forward seconds), and the forward seconds of every batch
        self.stats = {k: dict({key: 0 for key in SUMS}, seconds=[]) for k in self.all_names}
        self.per_image = {k: {key: [] for key in PER_IMAGE} for k in self.all_names}
        self.n = 0

    def batch(self, images: Tensor, labels: Tensor, order: random.Random) -> None:
        """Every runner (and its floors) on one batch, in ``order``'s random order; then the fidelity sums."""
        from .bench import Floor  # random tokens at a traced forward's per-image counts and widths
        self.n += images.shape[0]
        logits, correct = {}, {}
        for name in order.sample(self.names, len(self.names)):
            runner = self.runners[name]
            trace = self.run(name, runner, images, labels, logits, correct)
            if name in self.controls:
                for f in self.floors:
                    floor = LeanViT(runner.model, Floor(trace, runner.method.position, shuffle=f == "shuffled floor"))
                    self.run(f"{name} {f}", floor, images, labels, logits, correct)
        if self.reference in logits:
            self.compare(logits, correct)

    def run(self, name: str, runner: LeanViT, images: Tensor, labels: Tensor, logits: dict, correct: dict) -> list:
        """One timed, traced forward: its logits and correctness go to ``logits``/``correct``."""
        s = self.stats[name]
        with torch.inference_mode(), runner.tracing() as trace:
            t0 = time.perf_counter()
            logits[name] = runner(images)
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)  # the kernels are asynchronous: time them, not their launch
            s["seconds"].append(time.perf_counter() - t0)
            s["time"] += s["seconds"][-1]
        correct[name] = logits[name].argmax(dim=1) == labels
        s["correct"] += int(correct[name].sum())
        s["macs"] += float(macs_per_image(runner, trace, images).sum())
        s["decision"] += sum(float(torch.as_tensor(rec["macs"], dtype=torch.float64).expand(images.shape[0]).sum())
                             for rec in trace if "macs" in rec)
        if self.group:
            keys = image_configurations(trace, images.shape[0])
            for lo in range(0, len(keys), self.group):
                s["configs"] += len(set(keys[lo:lo + self.group]))
                s["groups"] += 1
        return trace

    def compare(self, logits: dict, correct: dict) -> None:
        """The sums of every runner's differences to the reference on this batch."""
        ref = logits[self.reference]
        for name in self.all_names:
            s, d = self.stats[name], correct[name].long() - correct[self.reference].long()
            agree, kl = logits[name].argmax(1) == ref.argmax(1), kl_per_image(ref, logits[name])
            s["d"] += int(d.sum())
            s["d2"] += int((d * d).sum())
            s["agree"] += int(agree.sum())
            s["kl"] += float(kl.sum())
            s["kl2"] += float((kl.double() ** 2).sum())
            if self.controls:  # per image, for the paired differences to the floors
                for key, t in zip(PER_IMAGE, (kl, agree, correct[name])):
                    self.per_image[name][key].append(t.cpu())

    def results(self, skipped: List[str]) -> Dict[str, EvalResult]:
        """Every runner's result over every process's images."""
        # over the processes (alone: as they are); integer counts and MACs add up exactly in float64
        n_local, n = self.n, int(all_sum([self.n])[0])
        skipped = [path for paths in all_gather(skipped) for path in paths]
        if n == 0:
            raise ValueError(f"no readable images to evaluate ({len(skipped)} unreadable)")
        totals = {name: dict(zip(SUMS, all_sum([s[k] for k in SUMS]))) for name, s in self.stats.items()}
        if self.controls and self.reference in totals:  # every process's images, in rank order
            self.per_image = {k: {key: torch.cat([t for part in all_gather(v) for t in part]) for key, v in d.items()}
                              for k, d in self.per_image.items()}
        results = {}
        for name in self.all_names:
            t = totals[name]
            fidelity = self.fidelity(name, totals, n) if self.reference in totals else {}
            results[name] = EvalResult(
                method=name, top1=100.0 * t["correct"] / n, gmacs=t["macs"] / n / 1e9,
                images_per_second=n / t["time"], n_images=n, skipped=len(skipped),
                skipped_paths=skipped, decision_gmacs=t["decision"] / n / 1e9,
                configurations=t["configs"] / max(t["groups"], 1) if self.group else None, **fidelity,
                extra=_image_mean(self.runners[name].method.stats(), n_local) if name in self.runners else {})
        return results

    def fidelity(self, name: str, totals: dict, n: int) -> dict:
        """``name``'s agreement, KL, top-1 difference and speedup against the reference, and its
        paired differences to its floors."""
        t, ref = totals[name], totals[self.reference]
        delta, ci = _mean_interval(t["d"], t["d2"], n)
        ratios = [r / x for r, x in zip(self.stats[self.reference]["seconds"], self.stats[name]["seconds"])]
        out = dict(agreement=100.0 * t["agree"] / n, kl_to_dense=t["kl"] / n,
                   kl_to_dense_ci95=_mean_interval(t["kl"], t["kl2"], n, scale=1.0)[1],
                   delta_top1=delta, delta_top1_ci95=ci, speedup=ref["time"] / t["time"],
                   speedup_iqr=_quartiles([r for part in all_gather(ratios) for r in part]))
        if name in self.controls:
            out["vs_random_floor"] = _versus(self.per_image[name], self.per_image[f"{name} floor"])
            if "shuffled floor" in self.floors:
                out["vs_shuffled_floor"] = _versus(self.per_image[name], self.per_image[f"{name} shuffled floor"])
        return out


def _image_mean(stats: dict, n_local: int) -> dict:
    """A method's statistics (means over this process's ``n_local`` images, maybe nested in dicts)
    as means over every process's images: each process's weighted by its image count."""
    parts = [(s, k) for s, k in all_gather((stats, n_local)) if k]
    if len(parts) <= 1:
        return dict(stats)

    def mean(values, weights):
        if isinstance(values[0], dict):
            return {key: mean([v[key] for v in values], weights) for key in values[0]}
        return sum(v * w for v, w in zip(values, weights)) / sum(weights)
    return mean([s for s, _ in parts], [k for _, k in parts])


def adapt_spec(model, spec: Spec, models: Optional[dict] = None) -> LeanViT:
    """``spec``'s method on ``model``, or on the model the spec names: a shipped model and/or a
    checkpoint (of the shipped model, else of a copy of ``model``), loaded once into ``models``,
    a cache by (name, checkpoint)."""
    if spec.model is not None or spec.checkpoint is not None:
        models = {} if models is None else models
        key = (spec.model, spec.checkpoint)
        if key not in models:
            if spec.model is not None:
                own = load_model(spec.model, checkpoint=spec.checkpoint)
            else:
                own = copy.deepcopy(model).cpu()
                load_fitting(own, read_state_dict(spec.checkpoint), spec.checkpoint, type(model).__name__)
            models[key] = own.eval().to(module_device(model))
        model = models[key]
    return adapt(model, spec.method, **spec.options)


def _runs_on(spec: Spec) -> dict:
    """What a row ran on when not the compared model: the shipped model and its weights file."""
    from .provenance import model_weights
    if spec.model is None and spec.checkpoint is None:
        return {}
    weights = model_weights(spec.model or "the compared model", checkpoint=spec.checkpoint)
    return dict(model_weights=weights, **({"model": spec.model} if spec.model else {}))


def sweep(model, loader, specs: list, desc: str = "sweep", amp: str = "off", random_floor: bool = False,
          shuffled_floor: bool = False) -> dict:
    """Dense and every :class:`~leanvit.options.Spec` in one pass over ``loader``.

    Returns ``{"dense": EvalResult-dict, "rows": [dict(method, label, options, ...EvalResult)]}``
    (and ``model_weights``, ``model`` in the rows of specs that run on a model of their own: a
    shipped model or a checkpoint, measured against ``model``'s dense forward). ``random_floor``: every
    row also carries ``random_floor`` (the result of random tokens at its per-image counts and
    widths) and ``vs_random_floor`` (see :func:`evaluate`); ``shuffled_floor`` (implies
    ``random_floor``): also ``shuffled_floor`` and ``vs_shuffled_floor``.
    """
    from .provenance import method_weights
    runners, models = {"dense": adapt(model, "none")}, {}
    for spec in specs:
        runners[f"{spec.method} {spec.label}"] = adapt_spec(model, spec, models)
    names = [f"{spec.method} {spec.label}" for spec in specs]
    random_floor = random_floor or shuffled_floor
    results = evaluate(runners, loader, desc=desc, amp=amp, controls=names if random_floor else (),
                       shuffled=shuffled_floor)
    rows = []
    for spec, name in zip(specs, names):
        r = results[name].to_dict()
        r.pop("skipped_paths")
        for key, floor in (("random_floor", "floor"), ("shuffled_floor", "shuffled floor")):
            if f"{name} {floor}" in results:
                r[key] = {k: v for k, v in results[f"{name} {floor}"].to_dict().items()
                          if k not in ("skipped_paths", "extra", "vs_random_floor", "vs_shuffled_floor")}
        rows.append(dict(r, method=spec.method, label=spec.label, options=spec.options,
                         method_weights=method_weights(spec.method, spec.options),
                         **_runs_on(spec)))
    return dict(dense=results["dense"].to_dict(), rows=rows)
