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

from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .bench import Floor
from .evaluate import kl_per_image, paired_interval
from .measure import macs_per_image
from .report import record_token_states
from .runtime import LeanViT
from .tokens import keep_first, sort_by_score

__all__ = ["patch_object_weights", "object_recall", "background_kept", "spearman", "OracleFloor",
           "oracle_floor_of", "object_measures", "object_report"]


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


def object_measures(runner: LeanViT, images: Tensor, boxes: Tensor) -> Dict[str, object]:
    """Per image, for one batch: object recall and background kept at each decision layer, the
    tokens and MACs the image got, and its object's area (the adaptivity correlation is taken over
    all images: :func:`spearman` of ``tokens`` or ``macs`` against ``area``)."""
    weights = patch_object_weights(boxes, _grid(runner))
    states = record_token_states(runner, images)
    with torch.inference_mode(), runner.tracing() as trace:
        runner(images)
    blocks = [rec for rec in trace if rec.get("layer") is not None]
    tokens = torch.stack([rec["mlp_tokens"].float().cpu() for rec in blocks]).mean(0)
    return dict(
        layers=[s.layer for s in states],
        recall=[object_recall(s.source, s.valid, s.n_prefix, weights) for s in states],
        background=[background_kept(s.source, s.valid, s.n_prefix, weights) for s in states],
        tokens=tokens, macs=macs_per_image(runner, trace, images), area=weights.sum(1) / weights.shape[1])


def _oracle_kl(runner: LeanViT, images: Tensor, weights: Tensor, dense_logits: Tensor) -> Tuple[Tensor, Tensor]:
    """(method's KL to dense, its oracle floor's KL to dense) per image, on one batch."""
    with torch.inference_mode(), runner.tracing() as trace:
        logits = runner(images)
    with torch.inference_mode():
        oracle = oracle_floor_of(runner, trace, weights)(images)
    return kl_per_image(dense_logits, logits), kl_per_image(dense_logits, oracle)


def object_report(runners: Dict[str, LeanViT], loader: Iterable, reference: str = "dense") -> Dict[str, dict]:
    """For every runner but ``reference``, over the images of ``loader`` (batches with boxes):
    mean object recall and background kept at each decision layer; the adaptivity (Spearman of
    the tokens and of the MACs an image gets against its object's area); and its oracle floor: KL
    to the reference of the object kept first at the method's own per-image counts, with the
    paired difference method - oracle (positive: the oracle is closer to dense)."""
    parts: Dict[str, Dict[str, list]] = {name: {} for name in runners if name != reference}
    for batch in loader:
        if batch.boxes is None:
            raise ValueError("object measures need the objects' boxes: use a cluttered data set "
                             "(--data cluttered-cifar10 or cluttered-cifar10-sample)")
        with torch.inference_mode():
            dense = runners[reference](batch.images)
        for name, acc in parts.items():
            got = object_measures(runners[name], batch.images, batch.boxes)
            kl, oracle = _oracle_kl(runners[name], batch.images,
                                    patch_object_weights(batch.boxes, _grid(runners[name])), dense)
            for key, value in (("tokens", got["tokens"]), ("macs", got["macs"]), ("area", got["area"]),
                               ("kl", kl), ("oracle", oracle)):
                acc.setdefault(key, []).append(value.double().cpu())
            for layer, recall, background in zip(got["layers"], got["recall"], got["background"]):
                acc.setdefault(f"recall {layer}", []).append(recall)
                acc.setdefault(f"background {layer}", []).append(background)
    return {name: _summarise(acc) for name, acc in parts.items()}


def _grid(runner: LeanViT) -> int:
    return int(round(runner.model.patch_embed.num_patches ** 0.5))


def _summarise(acc: Dict[str, list]) -> dict:
    cat = {k: torch.cat(v) for k, v in acc.items()}
    layers = sorted({int(k.split()[1]) for k in cat if k.startswith("recall ")})
    delta, ci = paired_interval(cat["kl"] - cat["oracle"])
    return dict(
        object_recall={str(l): float(cat[f"recall {l}"].mean()) for l in layers},
        background_kept={str(l): float(cat[f"background {l}"].mean()) for l in layers},
        adaptivity_tokens=spearman(cat["tokens"], cat["area"]),
        adaptivity_gmacs=spearman(cat["macs"], cat["area"]),
        oracle_floor_kl=float(cat["oracle"].mean()), vs_oracle_floor=dict(kl_to_dense=delta, kl_to_dense_ci95=ci))
