"""RL4EViT: token pruning learned by multi-agent PPO (one agent per patch token).

Pruning layers sit after blocks 3, 6 and 9. Every patch token is an agent; one shared actor reads
the token's feature and outputs keep/prune logits; one shared critic reads [token ; CLS].
Inference is greedy and removes the pruned tokens for real: per-image counts, a ragged batch that
the runtime runs packed (no padding in the token-wise work). Training samples actions and runs masked (``LeanViT.masked``) so the batch
keeps its shape and every token keeps its position, which lines agents up across layers for GAE.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..tokens import keep_mask
from .base import OptionError, Reduction, check_layers, load_weights, register


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def agent_rewards(kept: Tensor, alive: Tensor, correct: Tensor, alpha: float, beta: float) -> Tensor:
    """The paper's equations 1-2 for every agent at every pruning layer.

    kept, alive: (T, B, P) bool: the agent's action (keep) and whether the agent acted at that
    layer (its token was still there). correct: (B,) bool, the image's final prediction.
    ``R = alpha * r1 + beta * r2`` with r1 = -1 if kept else 0 and r2 = correct / n_l, n_l the
    tokens kept at layer l. Agents that did not act get 0.
    """
    r1 = -kept.to(torch.float32)
    n_kept = (kept & alive).sum(dim=2, keepdim=True).clamp_min(1).to(torch.float32)
    r2 = correct.to(torch.float32)[None, :, None] / n_kept
    return (alpha * r1 + beta * r2) * alive


@register
class RL4EViT(Reduction, nn.Module):
    """RL4EViT: multi-agent PPO token pruning, one agent per patch token, greedy at inference."""

    name = "rl4evit"
    position = "block"

    def __init__(self, layers=(3, 6, 9), hidden=None, weights=None, agents="multi"):
        nn.Module.__init__(self)
        self.layers, self.hidden, self.weights = layers, hidden, weights
        if agents not in ("multi", "single"):
            raise OptionError(f"rl4evit: agents must be 'multi' (one per token) or 'single' (one per layer), got {agents!r}")
        self.agents = agents
        if hidden is not None and (not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden)):
            raise OptionError(f"rl4evit: hidden must be a list of layer widths, got {hidden!r}")
        self.sampling = False  # True during training rollouts: sample actions and record them
        self.rollout: List[dict] = []

    def bind(self, info):
        super().bind(info)
        self.layers = check_layers("rl4evit", self.layers, info.depth)
        c = info.embed_dim
        hidden = list(self.hidden) if self.hidden else [4 * c, 256, 64]  # DeiT-S: 384-1536-256-64-2
        self.actor = mlp([c, *hidden, 2])
        self.critic = mlp([2 * c, *hidden, 1])  # DeiT-S: 768-1536-256-64-1
        if self.weights:
            load_weights(self, self.weights, "policy weights")

    def decision_layers(self):
        return self.layers

    def begin(self, batch: int) -> None:
        self.rollout = []

    def value(self, tokens: Tensor, cls: Tensor) -> Tensor:
        """(B, P) critic values of the agents from [token ; CLS]."""
        return self.critic(torch.cat([tokens, cls[:, None].expand_as(tokens)], dim=-1)).squeeze(-1)

    def pooled_value(self, tokens: Tensor, cls: Tensor, alive: Tensor) -> Tensor:
        """(B,) critic value of a whole layer (the single-agent ablation): [mean live token ; CLS]."""
        w = alive[..., None].to(tokens.dtype)
        mean = (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
        return self.critic(torch.cat([mean, cls], dim=-1)).squeeze(-1)

    def decision_macs(self, layer, state):
        """The actor on every live patch (the critic runs only in training)."""
        from ..flops import linear_macs
        return (state.counts() - state.n_prefix) * linear_macs(self.actor)

    def reduce(self, layer, state, attn):
        p = state.n_prefix
        tokens = state.x[:, p:]
        logits = self.actor(tokens)
        alive = state.valid[:, p:] if state.valid is not None else torch.ones_like(logits[..., 0], dtype=torch.bool)
        if self.sampling:
            dist = torch.distributions.Categorical(logits=logits.detach())
            action = dist.sample()
            keep = action == 1
            self.rollout.append(dict(layer=layer, tokens=tokens.detach(), cls=state.summary(self.info.has_cls).detach(),
                                     action=action, logp=dist.log_prob(action), alive=alive))
        else:
            keep = logits[..., 1] > logits[..., 0]  # greedy: the more likely action
        keep = keep & alive
        # an image whose agents all chose pruning keeps its most keep-inclined token
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            margin = (logits[..., 1] - logits[..., 0]).masked_fill(~alive, float("-inf"))
            keep[empty, margin[empty].argmax(dim=1)] = True
        if self.sampling:
            self.rollout[-1]["kept"] = keep  # what happened, including that fallback
        return keep_mask(state, keep)

    def why_not_static(self):
        return "rl4evit's agents keep a per-image number of tokens: a ragged batch"

    def extra_repr(self):
        return f"layers={self.layers}, agents={self.agents}" + \
            (f", weights={self.weights}" if self.weights else "")
