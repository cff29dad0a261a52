"""DynamicViT: learned keep/drop predictors before blocks 3, 6 and 9 (kept fractions ρ, ρ², ρ³).

Training (the module in train mode): hard Gumbel-softmax decisions, multiplied into the previous
ones, enter attention as a differentiable policy (``TokenState.policy``); ``extra_loss`` is the
keep-ratio loss ``2·Σ_s (mean keep_s − ρ^s)²`` that ``leanvit train`` adds to the task loss
(with ``--distill`` for the distillation to the dense teacher). Inference: each predictor's keep
scores pick the top ``⌊ρ^s·P⌋`` patches, which are gathered (real removal).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..tokens import keep_top
from .base import OptionError, Reduction, check_layers, load_weights, check_rate, register


class Predictor(nn.Module):
    """LN -> Linear(C, C) -> GELU; local half of the channels next to the (policy-masked) mean of
    the global half; MLP C -> C/2 -> C/4 -> 2 with log-softmax (index 0 = keep)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        w = policy[..., None].to(x.dtype)
        glob = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1))


@register
class DynamicViT(Reduction, nn.Module):
    """DynamicViT: learned predictors drop tokens before blocks 3, 6, 9 (ρ, ρ², ρ³ kept)."""

    name = "dynamicvit"
    position = "block"  # a predictor before block l sits after block l - 1

    def __init__(self, keep_rate=0.7, layers=(3, 6, 9), weights=None):
        nn.Module.__init__(self)
        self.keep_rate = check_rate("dynamicvit", "keep_rate", keep_rate)
        self.layers, self.weights = layers, weights
        self.decisions: List[Tensor] = []

    def bind(self, info):
        super().bind(info)
        self.layers = check_layers("dynamicvit", self.layers, info.depth)
        if self.layers[0] < 1:
            raise OptionError("dynamicvit: predictors sit before blocks 1..depth-1 (there is none before block 0)")
        self.n_patches0 = info.n_tokens - info.n_prefix
        self.predictors = nn.ModuleList(Predictor(info.embed_dim) for _ in self.layers)
        if self.weights:
            load_weights(self, self.weights, "predictor weights")

    def decision_layers(self):
        return [l - 1 for l in self.layers]

    def begin(self, batch: int) -> None:
        self.decisions = []

    def decision_macs(self, layer, state):
        """The stage's predictor on every live patch: its linear layers (in_conv's C x C and
        out_conv's C -> C/2 -> C/4 -> 2); norms, activations and the masked mean are not counted."""
        from ..flops import linear_macs
        return (state.counts() - state.n_prefix) * linear_macs(self.predictors[self.layers.index(layer + 1)])

    def reduce(self, layer, state, attn):
        stage = self.layers.index(layer + 1)
        p = state.n_prefix
        patches = state.x[:, p:]
        if self.training:
            prev = state.policy[:, p:] if state.policy is not None else patches.new_ones(patches.shape[:2])
            hard = F.gumbel_softmax(self.predictors[stage](patches, prev), hard=True)[..., 0] * prev
            self.decisions.append(hard)
            return state.replace(policy=torch.cat([hard.new_ones(state.batch, p), hard], dim=1))
        alive = patches.new_ones(patches.shape[:2]) if state.valid is None else state.valid[:, p:].to(patches.dtype)
        keep_score = self.predictors[stage](patches, alive)[..., 0]
        k = int(self.n_patches0 * self.keep_rate ** (stage + 1))
        return keep_top(state, keep_score, max(min(k, state.n_patches), 1))

    def extra_loss(self) -> Optional[Tensor]:
        """The keep-ratio loss of the last training forward (None at inference)."""
        if not self.decisions:
            return None
        return 2.0 * sum(((d.mean(dim=1) - self.keep_rate ** (s + 1)) ** 2).mean()
                         for s, d in enumerate(self.decisions))

    def why_not_static(self):
        # inference keeps a fixed top-k per stage (static); training samples Gumbel decisions
        if self.training:
            return "dynamicvit in training mode samples Gumbel-softmax decisions; call .eval() (inference keeps a fixed top-k)"
        return None

    def extra_repr(self):
        return f"keep_rate={self.keep_rate}, layers={self.layers}" + (f", weights={self.weights}" if self.weights else "")
