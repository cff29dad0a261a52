"""Comparisons at equal cost, for `leanvit compare` and `leanvit match`.

- :func:`at_gmacs`: every method's (GMACs, top-1) curve from sweep results, read at given GMACs by
  linear interpolation (never extrapolated), so methods are compared at the same cost.
- :func:`match_gmacs`: the setting of each fixed-count method whose GMACs are closest to a target
  (their token counts do not depend on the image, so one forward gives their exact cost).
- :func:`mean_tokens` / :func:`random_control`: the mean tokens per block that a (per-image)
  method keeps on some images, and the ``random:schedule=...`` spec that keeps random tokens at
  those counts: the control that tells a learned or scored choice from just keeping fewer tokens.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .flops import tokens_per_block
from .measure import count_macs, macs_per_image
from .options import parse_spec
from .runtime import LeanViT, adapt

BUDGET_OPTIONS = ("r", "keep_rate", "tokens")

# One budget knob per fixed-count method, over the range where it reduces at all.
BUDGET_GRIDS: Dict[str, List[str]] = {
    "tome": [f"tome:r={r}" for r in range(1, 33)],
    "evit": [f"evit:keep_rate={k / 100:.2f}" for k in range(20, 100)],
    "dynamicvit": [f"dynamicvit:keep_rate={k / 100:.2f}" for k in range(20, 100)],
    "ppt": [f"ppt:r={r}:threshold=scaled" for r in range(1, 61)],
    "random": [f"random:keep_rate={k / 100:.2f}:independent=false" for k in range(20, 100)],
}


def curve_key(row: Mapping) -> str:
    """One curve per method and option family: the budget options vary along a curve, every
    other option (PPT's threshold, layers, ...) makes another curve."""
    opts = {k: v for k, v in row["options"].items() if k not in BUDGET_OPTIONS}
    return row["method"] + "".join(f" {k}={v}" for k, v in sorted(opts.items()))


def load_sweep_results(path) -> dict:
    """A ``leanvit sweep`` results.json, checked before it is compared: every problem (not text, not
    JSON, no rows, a row without method, options or finite gmacs and top1, dense GMACs that are
    not a positive number) is a ValueError naming the file and the field."""
    import json
    import math
    from pathlib import Path

    def number(value, positive=False) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > 0 if positive else value >= 0)
    what = "a `leanvit sweep` results.json"
    try:
        result = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not text, so not {what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}), so not {what}") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or not result["rows"]:
        raise ValueError(f"{path}: no rows (a list of measured settings): not {what}")
    dense = result.get("dense")
    if not isinstance(dense, dict) or not number(dense.get("gmacs"), positive=True):
        raise ValueError(f"{path}: dense.gmacs must be a positive number, got "
                         f"{dense.get('gmacs') if isinstance(dense, dict) else dense!r}")
    for i, row in enumerate(result["rows"]):
        problem = "is not an object" if not isinstance(row, dict) else \
            "has no method name" if not isinstance(row.get("method"), str) else \
            "has no options (an object)" if not isinstance(row.get("options"), dict) else \
            next((f"{k} must be a finite number >= 0, got {row.get(k)!r}" for k in ("gmacs", "top1")
                  if not number(row.get(k))), None)
        if problem:
            raise ValueError(f"{path}: rows[{i}] {problem}")
    return result


def interpolate(points: Iterable[Tuple[float, float]], x: float) -> Optional[float]:
    """y at ``x`` on the piecewise-linear curve through ``points`` (x, y); None outside it."""
    points = sorted(points)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def at_gmacs(results: Sequence[Mapping], gmacs: Sequence[float], metric: str = "top1") -> Dict[str, List[Optional[float]]]:
    """``metric`` of every curve of the sweep ``results`` (their rows merged) at each of ``gmacs``."""
    curves = defaultdict(list)
    for r in results:
        for row in r["rows"]:
            if metric in row:
                curves[curve_key(row)].append((row["gmacs"], row[metric]))
    return {key: [interpolate(pts, g) for g in gmacs] for key, pts in sorted(curves.items())}


def format_at_gmacs(table: Mapping[str, List[Optional[float]]], gmacs: Sequence[float], dense: Mapping,
                    metric: str = "top1") -> str:
    lines = [f"dense: {metric} {dense[metric]:.2f} at {dense['gmacs']:.4f} GMACs" if metric in dense
             else f"dense: {dense['gmacs']:.4f} GMACs",
             f"{metric} at equal GMACs (linear between measured settings; blank outside a curve's range)", "",
             "| curve | " + " | ".join(f"{g:.4f} G ({g / dense['gmacs']:.2f})" for g in gmacs) + " |",
             "|---|" + "---:|" * len(gmacs)]
    for key, vals in table.items():
        lines.append(f"| {key} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def match_gmacs(model: torch.nn.Module, gmacs: float, images: Tensor,
                methods: Sequence[str] = ("tome", "evit", "ppt", "dynamicvit")) -> Dict[str, Tuple[str, float]]:
    """For each fixed-count method, ``(spec, GMACs)`` of its setting in :data:`BUDGET_GRIDS` whose
    GMACs on ``images`` (one forward; their cost does not depend on the image) are closest to
    ``gmacs``. A setting the model refuses (too many tokens removed) is skipped."""
    from .methods.base import OptionError
    unknown = [m for m in methods if m not in BUDGET_GRIDS]
    if unknown:
        raise OptionError(f"no budget grid for {', '.join(unknown)}; choose from {', '.join(BUDGET_GRIDS)}")
    out = {}
    for m in methods:
        costs = []
        for text in BUDGET_GRIDS[m]:
            spec = parse_spec(text)
            try:
                costs.append((text, count_macs(adapt(model, spec.method, **spec.options), images)))
            except OptionError:
                continue
        if costs:
            out[m] = min(costs, key=lambda c: abs(c[1] - gmacs))
    return out


def mean_tokens(runner: LeanViT, batches: Iterable[Tensor]) -> Tuple[List[float], float, int]:
    """(mean tokens per block, prefix included, that the MLP of each block ran on; mean GMACs per
    image; number of images) of ``runner`` over ``batches`` of images."""
    sums, gsum, n = None, 0.0, 0
    was_training = runner.training
    runner.eval()
    try:
        with torch.inference_mode():
            for images in batches:
                with runner.tracing() as trace:
                    runner(images)
                counts = tokens_per_block(trace).double().sum(1)
                sums = counts if sums is None else sums + counts
                gsum += float(macs_per_image(runner, trace, images).sum()) / 1e9
                n += images.shape[0]
    finally:
        runner.train(was_training)
    if not n:
        raise ValueError("no images")
    return (sums / n).tolist(), gsum / n, n


def random_control(counts: Sequence[float], n_prefix: int = 1) -> str:
    """The ``random:schedule=...`` spec keeping random tokens at ``counts`` per block (rounded,
    at least one patch)."""
    return "random:schedule=" + ",".join(str(max(n_prefix + 1, round(c))) for c in counts)
