"""Throughput of the dense model against token-reduction methods, measured in one run.

For every method three forwards are timed, interleaved repeat by repeat so that drift of the
machine hits all alike: the dense model, the method, and the method's *floor*: a forward that
keeps random tokens at exactly the per-image token counts (and channel widths) the method
produced, with no scoring, sorting or policy (:class:`Floor`). ``method - floor`` is the cost of
the decision itself.
"""
from __future__ import annotations

import collections
import linecache
import os
import platform
import random
import statistics
import time
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from .device import autocast, module_device
from .measure import count_macs
from .methods.base import Reduction
from .runtime import LeanViT, adapt
from .tokens import keep_first, sort_by_score


class Floor(Reduction):
    """The cheapest execution of what a method ran: per image, the same token counts and channel
    widths in every block, with random tokens kept (no scoring, sorting or policy). Replays a trace
    of the method on a batch; successive forwards take its images in turn (a forward of one image
    at a time replays them one by one). ``shuffle``: the *shuffled floor*, the decisions of the
    batch's images dealt to its images in a random order (same counts and widths in all, so the
    same MACs): the control for which image gets which budget, also where no token is reduced
    (channel widths only)."""

    name = "floor"

    def __init__(self, trace: List[dict], position: str, seed: int = 0, shuffle: bool = False):
        blocks = [rec for rec in trace if rec["layer"] is not None]
        self.position = position
        attn = torch.stack([rec["attn_tokens"] for rec in blocks]).cpu()  # (blocks, B)
        mlp = torch.stack([rec["mlp_tokens"] for rec in blocks]).cpu()
        # tokens per image before and after each block's decision (after its attention, or after it)
        before, self.counts = (attn, mlp) if position == "attention" else (mlp, torch.cat([attn[1:], mlp[-1:]]))
        self.layers = [i for i in range(len(blocks)) if bool((self.counts[i] < before[i]).any())]
        batch = attn.shape[1]
        self.width = [(_per_image(rec["heads"], batch), _per_image(rec["hidden"], batch)) for rec in blocks]
        self.generator = torch.Generator().manual_seed(seed)
        self.cursor, self.images, self.shuffle = 0, None, shuffle

    def decision_layers(self):
        return self.layers

    def prepare_layers(self):
        # where the widths change (as the method set them): a new width is a new packed layout
        return [i for i, w in enumerate(self.width) if not _same(w, self.width[i - 1] if i else (None, None))]

    def begin(self, batch):
        n = self.counts.shape[1]
        self.images = (self.cursor + torch.arange(batch)) % n
        if self.shuffle:
            self.images = self.images[torch.randperm(batch, generator=self.generator)]
        self.cursor = (self.cursor + batch) % n

    def prepare(self, runner, layer, state):
        heads, hidden = self.width[layer]
        return state.replace(heads=None if heads is None else heads[self.images].to(state.x.device),
                             hidden=None if hidden is None else hidden[self.images].to(state.x.device))

    def reduce(self, layer, state, attn):
        p = state.n_prefix
        k = (self.counts[layer][self.images] - p).to(state.x.device)
        noise = torch.rand(state.batch, state.x.shape[1] - p, generator=self.generator).to(state.x.device)
        return keep_first(sort_by_score(state, noise)[0], k)


def _same(a: Tuple[Optional[torch.Tensor], ...], b: Tuple[Optional[torch.Tensor], ...]) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b))


def _per_image(width, batch: int) -> Optional[torch.Tensor]:
    if width is None or not isinstance(width, torch.Tensor):
        return None if width is None else torch.full((batch,), int(width))
    return width.cpu()


def floor_of(runner: LeanViT, images: torch.Tensor) -> LeanViT:
    """A :class:`Floor` of ``runner``'s method on ``images``, on the same model."""
    with torch.inference_mode(), runner.tracing() as trace:
        runner(images)
    return LeanViT(runner.model, Floor(trace, runner.method.position))


def _time(runner: torch.nn.Module, images: torch.Tensor, one_at_a_time: bool = False) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        if one_at_a_time:  # batch size 1: every image its own forward
            for i in range(images.shape[0]):
                runner(images[i:i + 1])
        else:
            runner(images)
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)  # the kernels are asynchronous: time them, not their launch
        return time.perf_counter() - t0


def _measure(model, methods, images, repeats: int, warmup: int, progress: bool, one_at_a_time: bool):
    """Per runner (timm, dense, each method and its floor) the seconds of every repeat; the
    GMACs and statistics of each method."""
    dense = adapt(model, "none")
    runners: Dict[str, torch.nn.Module] = {"timm": model, "dense": dense}  # timm's own forward: the reference
    macs = {"dense": count_macs(dense, images)}
    stats = {}
    for label, name, opts in methods:
        runner = adapt(model, name, **opts)
        runners[label] = runner
        macs[label] = count_macs(runner, images)
        stats[label] = runner.method.stats()  # PPT: which images pruned rather than pooled
        runners[label + " floor"] = floor_of(runner, images)
    times: Dict[str, List[float]] = {k: [] for k in runners}
    total = (warmup + repeats) * len(runners)
    with tqdm(total=total, desc="bench", unit="forward", disable=not progress) as bar:
        order = list(runners)
        shuffle = random.Random(0).shuffle
        for i in range(warmup + repeats):
            shuffle(order)
            for label in order:
                t = _time(runners[label], images, one_at_a_time)
                if i >= warmup:
                    times[label].append(t)
                bar.update()
    return times, macs, stats


def benchmark(model: torch.nn.Module, methods: Sequence[Tuple[str, str, dict]], images: torch.Tensor,
              repeats: int = 5, warmup: int = 1, threads: Optional[int] = None,
              progress: bool = True, one_at_a_time: bool = False, amp: str = "off") -> dict:
    """Images/s of dense vs each ``(label, method, options)`` on the batch ``images``, on the
    model's device at ``amp`` precision (:func:`leanvit.device.autocast`).

    Returns a JSON-ready dict: settings, and per method the median images/s, speedup over dense,
    GMACs, GMACs ratio, efficiency (speedup / GMACs ratio), the floor's speed and the decision
    overhead in ms per batch and as a fraction of the method's time.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if threads:
        torch.set_num_threads(threads)
    model = model.eval()
    device = module_device(model)
    images = images.to(device)
    with autocast(device, amp):
        times, macs, stats = _measure(model, methods, images, repeats, warmup, progress, one_at_a_time)
    batch = images.shape[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(
        settings=dict(threads=torch.get_num_threads(), batch_size=1 if one_at_a_time else batch,
                      images=batch, input_size=list(images.shape[1:]),
                      repeats=repeats, warmup=warmup, statistic="median", torch=torch.__version__,
                      machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                      device=str(device), amp=amp, date=time.strftime("%Y-%m-%d")),
        dense=dict(images_per_second=batch / med["dense"], gmacs=macs["dense"], seconds=times["dense"],
                   timm_images_per_second=batch / med["timm"], timm_seconds=times["timm"]),
        methods={},
    )
    for label, name, opts in methods:
        t = med[label]
        speedup = med["dense"] / t
        ratio = macs["dense"] / macs[label]
        out["methods"][label] = dict(
            method=name, options=opts, images_per_second=batch / t, speedup=speedup,
            gmacs=macs[label], gmacs_ratio=ratio, efficiency=speedup / ratio, seconds=times[label])
        if label + " floor" in med:
            floor = med[label + " floor"]
            out["methods"][label].update(
                floor_images_per_second=batch / floor, floor_speedup=med["dense"] / floor,
                decision_overhead_ms=1000 * (t - floor), decision_overhead_fraction=(t - floor) / t,
                floor_seconds=times[label + " floor"])
        out["methods"][label].update(stats[label])
    return out


def format_speed_table(result: dict) -> str:
    """A plain-text table of :func:`benchmark`'s ``result``: the settings, then per runner its
    GMACs, images/s, speedup over dense, GMACs ratio, efficiency and, where timed, its random
    floor's speedup and the decision overhead."""
    s = result["settings"]
    lines = [f"threads={s['threads']} batch={s['batch_size']} images={s.get('images', s['batch_size'])} "
             f"input={'x'.join(map(str, s['input_size']))} "
             f"median of {s['repeats']} (warm-up {s['warmup']})",
             f"{'method':<22}{'GMACs':>8}{'img/s':>9}{'speedup':>9}{'GMACs x':>9}{'eff.':>7}"
             f"{'floor x':>9}{'decide ms':>11}"]
    d = result["dense"]
    lines.append(f"{'timm forward':<22}{d['gmacs']:>8.3f}{d['timm_images_per_second']:>9.1f}"
                 f"{d['timm_images_per_second'] / d['images_per_second']:>9.2f}{1:>9.2f}")
    lines.append(f"{'dense (leanvit)':<22}{d['gmacs']:>8.3f}{d['images_per_second']:>9.1f}{1:>9.2f}{1:>9.2f}")
    for label, m in result["methods"].items():
        floor = f"{m['floor_speedup']:>9.2f}{m['decision_overhead_ms']:>11.1f}" if "floor_speedup" in m else \
            f"{'-':>9}{'-':>11}"
        lines.append(f"{label:<22}{m['gmacs']:>8.3f}{m['images_per_second']:>9.1f}{m['speedup']:>9.2f}"
                     f"{m['gmacs_ratio']:>9.2f}{m['efficiency']:>7.2f}" + floor)
    return "\n".join(lines)


def calling_line() -> str:
    """``file:line code`` of the innermost caller in a leanvit or timm module, this one excepted.
    Modules are told by their ``__name__``, not their path: a virtualenv's path may contain either
    word, and then every frame of torch would look like one of ours."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] in ("leanvit", "timm") and module != __name__:
            path, line = frame.f_code.co_filename, frame.f_lineno
            return f"{os.path.basename(path)}:{line} {linecache.getline(path, line).strip()}"
        frame = frame.f_back
    return "?"


class _TimedOperators(TorchDispatchMode):
    """Count and time every ATen operator, keyed by the line of leanvit or timm that called it."""

    def __init__(self):
        super().__init__()
        self.stats = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        rec = self.stats[(str(func).replace("aten.", "").replace(".default", ""), calling_line())]
        rec[0] += 1
        rec[1] += dt
        return out


def profile_operators(runners: Dict[str, torch.nn.Module], images: torch.Tensor, repeats: int = 5,
                      top: int = 30) -> Dict[str, dict]:
    """Where each runner's forward time goes, operator by operator: per runner, its ``top``
    operators (name, calling line, calls and ms per forward), the operators' total, and the
    median wall time of a forward without profiling. The runners alternate repeat by repeat, so the
    machine's drift hits all alike; timing through a dispatch mode adds a little to every operator
    (compare runners of one call, not across calls)."""
    modes = {k: _TimedOperators() for k in runners}
    walls: Dict[str, List[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for r in runners.values():
            r(images)
        for _ in range(repeats):
            for k, r in runners.items():
                walls[k].append(_time(r, images))
                with modes[k]:
                    r(images)
    out = {}
    for k, mode in modes.items():
        ranked = sorted(mode.stats.items(), key=lambda kv: -kv[1][1])
        out[k] = dict(
            operators=[dict(op=op, where=where, calls=n // repeats, ms=1000 * t / repeats)
                       for (op, where), (n, t) in ranked[:top]],
            calls=sum(n for n, _ in mode.stats.values()) // repeats,
            operator_ms=1000 * sum(t for _, t in mode.stats.values()) / repeats,
            wall_ms=1000 * statistics.median(walls[k]), repeats=repeats)
    return out


def format_profile(profile: Dict[str, dict]) -> str:
    lines = []
    for k, p in profile.items():
        lines.append(f"{k}: {p['calls']} operator calls, {p['operator_ms']:.1f} ms in operators per forward; "
                     f"wall time without profiling {p['wall_ms']:.1f} ms (median of {p['repeats']})")
        lines += [f"{o['ms']:8.2f} ms {o['calls']:5d}  {o['op']:<28} {o['where'][:100]}" for o in p["operators"]]
    return "\n".join(lines)
