"""Instruments that read an image's object box (cluttered CIFAR-10): which tokens a method keeps.

* **object recall** at each decision: the share of the object's area still represented by the
  image's real tokens (a merged token counts for every patch it stands for);
* **background kept**: the share of the kept patch tokens that is background (each token weighs the
  background fraction of the patches it stands for);
* **adaptivity**: the Spearman correlation, over images, between the tokens (or MACs) an image gets
  and its object's area;
* **the oracle floor**: a runner that keeps the object's patches first (from the box), at a method's
  own per-image counts: what perfect knowledge of where the object is would give at the same cost.

A patch's object weight is the fraction of its area inside the box, so recall and background are
exact areas, not a threshold.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .bench import Floor
from .device import all_gather, is_main
from .evaluate import adapt_spec, kl_per_image, paired_interval
from .measure import macs_per_image
from .token_maps import token_states_of
from .runtime import LeanViT, adapt
from .tokens import keep_first, sort_by_score

__all__ = ["boxes_as_seen", "patch_object_weights", "object_recall", "background_kept", "spearman", "OracleFloor",
           "oracle_floor_of", "object_measures", "object_report", "attach_object_measures", "format_object_table"]


def boxes_as_seen(boxes: Tensor, model) -> Tensor:
    """``boxes`` (fractions of the square canvas the data composed) as fractions of the input
    ``model`` sees after its evaluation preprocessing (:func:`leanvit.data.eval_transform`): timm
    resizes the canvas to ``floor(size / crop_pct)`` and crops the centre, so a ``crop_pct`` below 1
    enlarges the box and cuts what falls outside. Raises for preprocessing it cannot follow."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config(model=getattr(model, "model", model))
    _, h, w = cfg["input_size"]
    if cfg.get("crop_mode", "center") != "center" or h != w:
        raise ValueError(f"object boxes follow a centre crop of a square input; this model's preprocessing is "
                         f"crop_mode={cfg.get('crop_mode')!r} at {h}x{w}")
    scaled = math.floor(h / cfg["crop_pct"])
    offset = int(round((scaled - h) / 2.0))  # torchvision's CenterCrop
    return ((boxes.float() * scaled - offset) / h).clamp(0.0, 1.0)


def patch_object_weights(boxes: Tensor, grid: int) -> Tensor:
    """(B, grid*grid) fraction of each patch's area inside its image's box; ``boxes`` (B, 4) are
    ``(x0, y0, x1, y1)`` fractions of the image; patches in row-major order (timm's)."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    lo, hi = edges[:-1], edges[1:]

    def overlap(a: Tensor, b: Tensor) -> Tensor:  # (B, grid): covered share of each patch column/row
        return ((torch.minimum(b[:, None], hi) - torch.maximum(a[:, None], lo)).clamp(min=0) * grid)

    boxes = boxes.float().cpu()
    cols, rows = overlap(boxes[:, 0], boxes[:, 2]), overlap(boxes[:, 1], boxes[:, 3])
    return (rows[:, :, None] * cols[:, None, :]).flatten(1)


def _patch_sources(source: Tensor, valid: Optional[Tensor], n_prefix: int) -> Tensor:
    """(B, N-prefix, P) which input patches each real patch token stands for (prefix rows/columns
    dropped, padding rows zeroed)."""
    src = source[:, n_prefix:, n_prefix:].float()
    if valid is not None:
        src = src * valid[:, n_prefix:, None].float()
    return src


def object_recall(source: Tensor, valid: Optional[Tensor], n_prefix: int, weights: Tensor) -> Tensor:
    """(B,) share of each object's area represented by a real token after a decision."""
    represented = (_patch_sources(source, valid, n_prefix).sum(1) > 0).float()
    return (represented * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def background_kept(source: Tensor, valid: Optional[Tensor], n_prefix: int, weights: Tensor) -> Tensor:
    """(B,) mean background fraction of the real patch tokens after a decision."""
    src = _patch_sources(source, valid, n_prefix)
    patches = src.sum(2)  # (B, N) patches each token stands for; 0 for padding
    background = ((1.0 - weights)[:, None, :] * src).sum(2) / patches.clamp(min=1)
    real = (patches > 0).float()
    return (background * real).sum(1) / real.sum(1).clamp(min=1)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def spearman(a, b) -> Optional[float]:
    """Spearman's rank correlation of two sequences; None where either is constant (a static method
    gives every image the same tokens: no correlation to speak of)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


class OracleFloor(Floor):
    """A method's per-image token counts (replayed from its trace, as :class:`~leanvit.bench.Floor`),
    the patches kept being those with the most object area (from the box); ties broken at random.
    Needs source tracking on its runner (:func:`oracle_floor_of` sets it)."""

    name = "oracle floor"

    def __init__(self, trace: List[dict], position: str, weights: Tensor, seed: int = 0):
        super().__init__(trace, position, seed=seed)
        self.weights = weights

    def reduce(self, layer, state, attn):
        p = state.n_prefix
        k = (self.counts[layer][self.images] - p).to(state.x.device)
        area = _patch_sources(state.source, state.valid, p) @ self.weights[self.images].to(state.x)[:, :, None]
        noise = torch.rand(state.batch, state.x.shape[1] - p, generator=self.generator).to(state.x.device)
        return keep_first(sort_by_score(state, area.squeeze(-1) + 1e-3 * noise)[0], k)


def oracle_floor_of(runner: LeanViT, trace: List[dict], weights: Tensor) -> LeanViT:
    """A runner keeping the object first at the per-image counts of ``trace`` (a forward of
    ``runner`` on the images whose patch weights are ``weights``)."""
    oracle = LeanViT(runner.model, OracleFloor(trace, runner.method.position, weights))
    oracle.track_source = True
    return oracle


def object_measures(runner: LeanViT, images: Tensor, boxes: Tensor,
                    dense_logits: Optional[Tensor] = None) -> Dict[str, object]:
    """Per image, for one batch (``boxes`` as the model sees them: :func:`boxes_as_seen`), from one
    traced forward: object recall and background kept at each decision layer, the tokens and MACs
    the image got, and its object's area (the adaptivity correlation is taken over all images:
    :func:`spearman` of ``tokens`` or ``macs`` against ``area``). With ``dense_logits`` also ``kl``
    and ``oracle``: the KL to dense of this forward and of its oracle floor (one more forward)."""
    weights = patch_object_weights(boxes, _grid(runner))
    with torch.inference_mode(), runner.tracing(track_source=True) as trace:
        logits = runner(images)
    states = token_states_of(trace, runner.n_prefix)
    blocks = [rec for rec in trace if rec.get("layer") is not None]
    tokens = torch.stack([rec["mlp_tokens"].float().cpu() for rec in blocks]).mean(0)
    got = dict(
        layers=[s.layer for s in states],
        recall=[object_recall(s.source, s.valid, s.n_prefix, weights) for s in states],
        background=[background_kept(s.source, s.valid, s.n_prefix, weights) for s in states],
        tokens=tokens, macs=macs_per_image(runner, trace, images), area=weights.sum(1) / weights.shape[1])
    if dense_logits is not None:
        with torch.inference_mode():
            oracle = oracle_floor_of(runner, trace, weights)(images)
        got.update(kl=kl_per_image(dense_logits, logits), oracle=kl_per_image(dense_logits, oracle),
                   floor_recall=_floor_recall(runner, trace, images, weights))
    return got


def _floor_recall(runner: LeanViT, trace: List[dict], images: Tensor, weights: Tensor) -> Dict[int, Tensor]:
    """Per decision layer, the object recall of random tokens at the per-image counts of ``trace``:
    what a method's recall is worth against the same budget spent blindly (about the share of
    tokens kept, by construction)."""
    floor = LeanViT(runner.model, Floor(trace, runner.method.position))
    with torch.inference_mode(), floor.tracing(track_source=True) as floor_trace:
        floor(images)
    return {s.layer: object_recall(s.source, s.valid, s.n_prefix, weights)
            for s in token_states_of(floor_trace, runner.n_prefix)}


def object_report(runners: Dict[str, LeanViT], loader: Iterable, reference: str = "dense") -> Dict[str, dict]:
    """For every runner but ``reference``, over the images of ``loader`` (batches with boxes, as
    the data composed them; the images preprocessed by :func:`leanvit.data.eval_transform`):
    mean object recall and background kept at each decision layer; the adaptivity (Spearman of
    the tokens and of the MACs an image gets against its object's area); and its oracle floor: KL
    to the reference of the object kept first at the method's own per-image counts, with the
    paired difference method - oracle (positive: the oracle is closer to dense)."""
    parts: Dict[str, Dict[str, list]] = {name: {} for name in runners if name != reference}
    bar = tqdm(loader, desc="object measures", unit="batch", dynamic_ncols=True, disable=not is_main())
    for batch in bar:
        if batch.boxes is None:
            raise ValueError("object measures need the objects' boxes: use a cluttered data set "
                             "(--data cluttered-cifar10 or cluttered-cifar10-sample)")
        with torch.inference_mode():
            dense = runners[reference](batch.images)
        boxes = boxes_as_seen(batch.boxes, runners[reference].model)
        for name, acc in parts.items():
            got = object_measures(runners[name], batch.images, boxes, dense_logits=dense)
            for key in ("tokens", "macs", "area", "kl", "oracle"):
                acc.setdefault(key, []).append(got[key].double().cpu())
            for layer, recall, background in zip(got["layers"], got["recall"], got["background"]):
                acc.setdefault(f"recall {layer}", []).append(recall)
                acc.setdefault(f"background {layer}", []).append(background)
            for layer, recall in got["floor_recall"].items():
                acc.setdefault(f"floor {layer}", []).append(recall)
    # under torchrun every process measured its shard: every image, in rank order
    parts = {name: {k: [t for part in all_gather(v) for t in part] for k, v in acc.items()}
             for name, acc in parts.items()}
    return {name: _summarise(acc) for name, acc in parts.items()}


def _grid(runner: LeanViT) -> int:
    return int(round(runner.model.patch_embed.num_patches ** 0.5))


def _summarise(acc: Dict[str, list]) -> dict:
    cat = {k: torch.cat(v) for k, v in acc.items()}
    layers = sorted({int(k.split()[1]) for k in cat if k.startswith("recall ")})
    delta, ci = paired_interval(cat["kl"] - cat["oracle"])
    return dict(
        object_recall={str(l): float(cat[f"recall {l}"].mean()) for l in layers},
        floor_object_recall={k.split()[1]: float(v.mean()) for k, v in cat.items() if k.startswith("floor ")},
        background_kept={str(l): float(cat[f"background {l}"].mean()) for l in layers},
        adaptivity_tokens=spearman(cat["tokens"], cat["area"]),
        adaptivity_gmacs=spearman(cat["macs"], cat["area"]),
        oracle_floor_kl=float(cat["oracle"].mean()), vs_oracle_floor=dict(kl_to_dense=delta, kl_to_dense_ci95=ci))


def attach_object_measures(result: dict, model, loader, specs) -> None:
    """Add each row of a sweep ``result`` its ``objects`` (:func:`object_report`), measured on
    ``loader`` (a second pass over the images, which must carry boxes)."""
    runners, models = {"dense": adapt(model, "none")}, {}
    for spec in specs:
        runners[f"{spec.method} {spec.label}"] = adapt_spec(model, spec, models)
    report = object_report(runners, loader)
    for spec, row in zip(specs, result["rows"]):
        row["objects"] = report[f"{spec.method} {spec.label}"]


def format_object_table(rows) -> str:
    """Object recall at the first and last decision, background kept at the last, adaptivity
    (Spearman of tokens and of GMACs against the object's area; - where every image gets the same),
    and the KL to dense of the method and of its oracle floor, with the paired difference."""
    def num(v, digits=2):
        return "-" if v is None else f"{v:+.{digits}f}" if digits == 2 else f"{v:.{digits}f}"

    def first_last(recall):
        return f"{recall[min(recall, key=int)]:.2f}>{recall[max(recall, key=int)]:.2f}" if recall else "-"

    lines = [f"{'method':<14}{'budget':<26}{'recall first>last':>18}{'random':>10}{'bg kept':>8}{'adapt tok':>10}"
             f"{'adapt GMACs':>12}{'KL':>8}{'oracle KL':>10}  KL - oracle [95%]"]
    for r in rows:
        o = r.get("objects")
        if not o:
            continue
        layers = list(o["object_recall"])
        bg = f"{o['background_kept'][layers[-1]]:.2f}" if layers else "-"
        vs = o["vs_oracle_floor"]
        lines.append(f"{r['method']:<14}{str(r.get('label', ''))[:25]:<26}{first_last(o['object_recall']):>18}"
                     f"{first_last(o.get('floor_object_recall')):>10}{bg:>8}"
                     f"{num(o['adaptivity_tokens']):>10}{num(o['adaptivity_gmacs']):>12}{r.get('kl_to_dense', 0):>8.4f}"
                     f"{o['oracle_floor_kl']:>10.4f}  {vs['kl_to_dense']:+.4f} "
                     f"[{vs['kl_to_dense_ci95'][0]:+.4f}, {vs['kl_to_dense_ci95'][1]:+.4f}]")
    return "\n".join(lines + [
        "recall: share of the object's area a token still stands for, at the first and last decision; a merging method "
        "(ToMe, EViT's fused token) stands for every patch, so there only bg kept tells what it kept apart; "
        "random: the recall of random tokens at the method's own per-image counts",
        "oracle KL: the object's patches kept first at the method's own per-image counts"])
