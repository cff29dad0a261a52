"""PRANCE: per image, a selector chooses each stage's channel widths and token keep ratio.

The blocks form ``stages`` stages (4 stages of 3 for 12 blocks). The first stage runs at full
width; before every later stage a small actor-critic (the selector) reads the current tokens and
picks, for that stage, the attention heads and MLP neurons (first-k slices of the meta-network's
weights, see :mod:`leanvit.elastic`) and the ratio of patch tokens to keep. The tokens are
reduced inside the stage's first block, after its attention (which gives the CLS-attention
importance, as in EViT), so that block's MLP and the rest of the stage run on the kept tokens.

Decisions are per image and executed for real: images that chose the same configuration run
together as one sub-batch, with physically smaller matmuls and fewer tokens; a batch splits into
groups at every stage boundary and the logits are put back in order at the end.

Token strategies: ``prune`` (keep the top ⌊ρN⌋ patches by CLS attention), ``merge`` (those are
destinations; every other patch joins its most similar one), ``prune-merge`` (prune to ⌊ρ₁N⌋,
then merge down to ⌊ρ₂·ρ₁N⌋) and ``none`` (channels only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..tokens import TokenState, keep_top, merge_into_top
from .base import OptionError, Reduction, check_int, load_weights, register, require_cls
from .rl4evit import mlp

HEAD_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MLP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
KEEP_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STRATEGIES = ("prune", "merge", "prune-merge", "none")
SUBNETS = ("largest", "middle", "smallest")


@dataclass(frozen=True)
class StageChoice:
    """What one stage runs with: first ``heads`` heads, first ``hidden`` MLP neurons, and the
    ratio ``keep`` of its input patches kept (then ``merge`` of those, for prune-merge)."""

    heads: int
    hidden: int
    keep: float = 1.0
    merge: float = 1.0


class Selector(nn.Module):
    """PRANCE's actor-critic: two hidden layers of 256; Gaussian actions whose means lie in (0, 1),
    each action dimension mapped to one discrete choice."""

    def __init__(self, in_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)  # hidden states have large scales
        self.actor = mlp([in_dim, hidden, hidden, action_dim])
        self.critic = mlp([in_dim, hidden, hidden, 1])
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(0.2)))

    def distribution(self, features: Tensor) -> torch.distributions.Normal:
        mean = torch.sigmoid(self.actor(self.norm(features)))
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def value(self, features: Tensor) -> Tensor:
        return self.critic(self.norm(features)).squeeze(-1)


def _choices(fractions, full: int) -> Tuple[int, ...]:
    return tuple(sorted({max(1, math.ceil(f * full)) for f in fractions}))


def _pick(options: tuple, a: Tensor) -> List:
    """Map actions in [0, 1] (any real, clamped) to ``options``: [0, 1/n) -> the first, ..."""
    idx = (a.clamp(0, 1) * len(options)).long().clamp(max=len(options) - 1)
    return [options[i] for i in idx.tolist()]


@register
class Prance(Reduction, nn.Module):
    """PRANCE: a selector picks channels and tokens per image and stage (see the module doc)."""

    name = "prance"
    token_floor = False
    groups_images = True  # images that chose differently run as separate sub-batches

    def __init__(self, strategy=None, channels=None, stages=4, weights=None, subnet=None):
        nn.Module.__init__(self)
        # strategy and channels default to what the selector weights were trained with (else
        # prune, with channels): adapt(model, "prance", weights=NAME) needs nothing else
        self.strategy_option, self.channels_option = strategy, channels
        self.weights, self.subnet = weights, subnet
        if subnet is not None and subnet not in SUBNETS:
            raise OptionError(f"prance: subnet must be one of {', '.join(SUBNETS)} (or unset for the selector), got {subnet!r}")
        self.n_stages = check_int("prance", "stages", stages, low=2)
        self.fixed: Optional[StageChoice] = None  # every image and stage runs this (sub-network training)
        # selector training: sample actions and record a rollout in which, after each decision,
        # the network is finished at full width from there (Result-to-Go)
        self.sampling = False
        self.rollout: List[dict] = []
        self._choice: Optional[StageChoice] = None  # the configuration of the group being run

    def _resolve_options(self) -> None:
        trained = self._trained_options() if self.weights else {}
        strategy, channels = self.strategy_option, self.channels_option
        if strategy is None:
            strategy = trained.get("strategy", "prune")
        if channels is None:
            channels = trained.get("channels", "true") == "true"
        if strategy not in STRATEGIES:
            raise OptionError(f"prance: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if not isinstance(channels, bool):
            raise OptionError(f"prance: channels must be true or false, got {channels!r}")
        if strategy == "none" and not channels:
            raise OptionError("prance: with strategy=none and channels=false there is nothing to decide")
        self.strategy, self.channels = strategy, channels
        mine = self.options_metadata()
        diff = {k: v for k, v in trained.items() if k in mine and mine[k] != v}
        if diff:
            raise OptionError(f"prance: the selector {self.weights} was trained with "
                              f"{' '.join(f'{k}={trained[k]}' for k in ('strategy', 'channels', 'stages') if k in trained)}; "
                              f"pass those options (got {' '.join(f'{k}={mine[k]}' for k in diff)})")

    def _trained_options(self) -> Dict[str, str]:
        """The options stored with the selector weights (empty if none or unreadable)."""
        from safetensors import safe_open
        from ..zoo import method_weights_path
        try:
            with safe_open(method_weights_path(self.weights, self.name), "pt") as f:
                return f.metadata() or {}
        except Exception:
            return {}  # missing or unreadable: load_weights says so

    def bind(self, info):
        super().bind(info)
        self._resolve_options()
        if self.strategy != "none":
            require_cls("prance", info)
        if info.depth < self.n_stages:
            raise OptionError(f"prance: {self.n_stages} stages need at least as many blocks, the model has {info.depth}")
        self.bounds = [round(i * info.depth / self.n_stages) for i in range(self.n_stages + 1)]
        self.head_options = _choices(HEAD_FRACTIONS, info.num_heads)
        self.mlp_options = _choices(MLP_FRACTIONS, info.mlp_hidden)
        self.full = StageChoice(info.num_heads, info.mlp_hidden)
        self.action_dim = (2 if self.channels else 0) + {"none": 0, "prune-merge": 2}.get(self.strategy, 1)
        self.selector = Selector(2 * info.embed_dim + self.n_stages, self.action_dim)
        if self.weights:
            load_weights(self, self.weights, "selector weights")
        if self.subnet is not None:
            self.fixed = self.subnetwork(self.subnet)

    def options_metadata(self) -> Dict[str, str]:
        """The options a selector is trained for, stored with its weights."""
        return dict(method=self.name, strategy=self.strategy, channels=str(self.channels).lower(),
                    stages=str(self.n_stages))

    def subnetwork(self, which: str) -> StageChoice:
        """The largest, middle or smallest channel configuration (all tokens kept)."""
        i = {"largest": -1, "middle": None, "smallest": 0}[which]
        pick = (lambda o: o[len(o) // 2 - 1 if len(o) > 1 else 0]) if i is None else (lambda o: o[i])
        return StageChoice(pick(self.head_options), pick(self.mlp_options))

    def random_subnetwork(self, generator: torch.Generator) -> StageChoice:
        def pick(options):
            return options[int(torch.randint(len(options), (1,), generator=generator))]
        return StageChoice(pick(self.head_options), pick(self.mlp_options))

    def decision_layers(self):
        return self.bounds[1:-1]  # the first block of every stage after the first

    def stage_blocks(self, k: int) -> range:
        return range(self.bounds[k], self.bounds[k + 1])

    # --- decisions -------------------------------------------------------------------------
    def features(self, state: TokenState, k: int) -> Tensor:
        """The selector's view of the tokens before stage ``k``: [CLS ; mean patch ; stage one-hot ;
        fraction of the patches left]."""
        x, p = state.x, state.n_prefix
        stage = x.new_zeros(state.batch, self.n_stages - 1)
        stage[:, k - 1] = 1.0
        left = x.new_full((state.batch, 1), state.n_patches / (self.info.n_tokens - p))
        return torch.cat([x[:, 0], x[:, p:].mean(dim=1), stage, left], dim=1)

    def to_choices(self, actions: Tensor) -> List[StageChoice]:
        """(B, action_dim) actions in [0, 1] -> a StageChoice per image."""
        cols = iter(actions.unbind(dim=1))
        b = actions.shape[0]
        heads = _pick(self.head_options, next(cols)) if self.channels else [self.full.heads] * b
        hidden = _pick(self.mlp_options, next(cols)) if self.channels else [self.full.hidden] * b
        keep = _pick(KEEP_RATIOS, next(cols)) if self.strategy != "none" else [1.0] * b
        merge = _pick(KEEP_RATIOS, next(cols)) if self.strategy == "prune-merge" else [1.0] * b
        return [StageChoice(*c) for c in zip(heads, hidden, keep, merge)]

    def decide(self, state: TokenState, k: int) -> Tuple[List[StageChoice], Optional[dict]]:
        """Per-image choices for stage ``k`` (and, when sampling, what the rollout records)."""
        if self.fixed is not None:
            return [self.fixed] * state.batch, None
        feats = self.features(state, k)
        dist = self.selector.distribution(feats)
        if not self.sampling:
            return self.to_choices(dist.mean), None
        actions = dist.sample()
        record = dict(stage=k, rows=_rows(state), features=feats, actions=actions,
                      logp=dist.log_prob(actions).sum(dim=-1))
        return self.to_choices(actions), record

    def reduce(self, layer, state, attn):
        c = self._choice
        if c is None or self.strategy == "none" or (c.keep >= 1.0 and c.merge >= 1.0):
            return state
        scores = attn.cls_attn.mean(dim=1)[:, state.n_prefix:]
        n = state.n_patches
        k = max(1, math.floor(c.keep * n))
        if self.strategy == "prune":
            return keep_top(state, scores, k)
        if self.strategy == "merge":
            return merge_into_top(state, scores, k)
        pruned = keep_top(state, scores, k)  # prune-merge: survivors come ordered by score
        return merge_into_top(pruned, scores.topk(k, dim=1).values, max(1, math.floor(c.merge * k)))

    # --- execution -------------------------------------------------------------------------
    def run(self, runner, state: TokenState) -> Tensor:
        """Stage 0 at full width, then per stage: decide per image, run each group of images that
        chose alike as one sub-batch, recurse; the logits come back in the batch's order."""
        self.rollout = []
        self._choice = None
        for i in self.stage_blocks(0):
            state = runner.run_block(i, runner.model.blocks[i], state)
        parts: List[Tuple[Tensor, Tensor]] = []
        self._descend(runner, state, 1, self._stage_macs(runner, 0, None, state.n_patches, state.n_patches), parts)
        self._choice = None
        if len(parts) == 1:
            return parts[0][1]
        out = parts[0][1].new_empty((state.batch,) + parts[0][1].shape[1:])
        for rows, logits in parts:
            out[rows] = logits
        return out

    def _descend(self, runner, state: TokenState, k: int, macs: float, parts: list) -> None:
        if k == self.n_stages:
            parts.append((_rows(state), runner.finish(state)))
            return
        choices, record = self.decide(state, k)
        if self.fixed is None:
            runner.note_macs(state.rows, self.selector_macs())
        groups: Dict[StageChoice, List[int]] = {}
        for i, c in enumerate(choices):
            groups.setdefault(c, []).append(i)
        for choice, idx in groups.items():
            sub = state if len(idx) == state.batch else state.select_images(torch.tensor(idx, device=state.x.device))
            n_in = sub.n_patches
            self._choice = choice
            for i in self.stage_blocks(k):
                sub = runner.run_block(i, runner.model.blocks[i], sub, widths=(choice.heads, choice.hidden))
            self._choice = None
            done = macs + self._stage_macs(runner, k, choice, n_in, sub.n_patches)
            if record is not None:
                self._record(runner, record, idx, sub, k, done)
            self._descend(runner, sub, k + 1, done, parts)

    def _record(self, runner, record: dict, idx: List[int], state: TokenState, k: int, macs: float) -> None:
        """One rollout step for a group: its part of the decision, and (Result-to-Go) the
        prediction and block MACs of the network finished at full width from here."""
        sel = torch.tensor(idx, device=state.x.device)
        step = {key: (v[sel] if isinstance(v, Tensor) else v) for key, v in record.items()}
        step["kept"] = state.n_patches / (self.info.n_tokens - self.info.n_prefix)
        x = state
        for j in range(self.bounds[k + 1], self.bounds[-1]):
            x = runner.run_block(j, runner.model.blocks[j], x)
        rest = sum(self._stage_macs(runner, s, None, x.n_patches, x.n_patches) for s in range(k + 1, self.n_stages))
        step["logits"] = runner.head(x)
        step["block_macs"] = macs + rest
        self.rollout.append(step)

    def _stage_macs(self, runner, k: int, choice: Optional[StageChoice], n_in: int, n_out: int) -> float:
        """Block MACs of stage ``k`` for one image: ``n_in`` patches at its first attention,
        ``n_out`` after the reduction."""
        from ..flops import block_macs
        p = self.info.n_prefix
        widths = (choice.heads, choice.hidden) if choice is not None else (None, None)
        return float(sum(block_macs(runner.model.blocks[i], (n_in if i == self.bounds[k] else n_out) + p, n_out + p, *widths)
                         for i in self.stage_blocks(k)))

    def dense_block_macs(self, runner) -> float:
        n = self.info.n_tokens - self.info.n_prefix
        return sum(self._stage_macs(runner, k, None, n, n) for k in range(self.n_stages))

    def selector_macs(self) -> int:
        from ..flops import linear_macs
        return linear_macs(self.selector.actor)

    def extra_repr(self):
        fixed = f", subnet={self.subnet}" if self.subnet else ""
        strategy = getattr(self, "strategy", self.strategy_option)  # resolved when bound
        channels = getattr(self, "channels", self.channels_option)
        return f"strategy={strategy}, channels={channels}, stages={self.n_stages}{fixed}" + \
            (f", weights={self.weights}" if self.weights else "")


def _rows(state: TokenState) -> Tensor:
    return state.rows if state.rows is not None else torch.arange(state.batch, device=state.x.device)
