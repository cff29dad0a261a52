"""PRANCE: per image, a selector chooses each stage's channel widths and token keep ratio.

The blocks form ``stages`` stages (4 stages of 3 for 12 blocks). The first stage runs at full
width; before every later stage a small actor-critic (the selector) reads the current tokens and
picks, for that stage, the attention heads and MLP neurons (first-k slices of the meta-network's
weights, see :mod:`leanvit.elastic`) and the ratio of patch tokens to keep. The tokens are
reduced inside the stage's first block, after its attention (which gives the CLS-attention
importance, as in EViT), so that block's MLP and the rest of the stage run on the kept tokens.

Decisions are per image and executed for real, without splitting the batch: the choices travel
with the tokens (``TokenState.heads``/``hidden``/``plan``) and the runtime runs the batch packed,
one matmul per distinct width and fewer tokens where images kept fewer.

Token strategies: ``prune`` (keep the top ⌊ρN⌋ patches by CLS attention), ``merge`` (those are
destinations; every other patch joins its most similar one), ``prune-merge`` (prune to ⌊ρ₁N⌋,
then merge down to ⌊ρ₂·ρ₁N⌋) and ``none`` (channels only).

``random=true`` replaces the selector by uniform random choices per image and stage (seeded by
``seed``, no network): PRANCE's random floor over its whole action space, and ragged per-image
widths on any channel-elastic ViT (for measuring packed execution where no selector is trained).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..tokens import TokenState, keep_first, merge_into_first, sort_by_score
from .base import OptionError, Reduction, check_int, forward_generator, load_weights, register, start_forward_draws
from .rl4evit import mlp

HEAD_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MLP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
KEEP_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STRATEGIES = ("prune", "merge", "prune-merge", "none")
SUBNETS = ("largest", "middle", "smallest")
# the selector's state: [CLS ; mean patch ; stage ; left], or [mean key of the last block ; stage ; left]
SELECTOR_STATES = ("summary", "keys")


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

    def mean(self, features: Tensor) -> Tensor:
        """The actions' means: what inference picks (no distribution object to build)."""
        return torch.sigmoid(self.actor(self.norm(features)))

    def distribution(self, features: Tensor) -> torch.distributions.Normal:
        mean = self.mean(features)
        # no argument validation: one NaN image must not fail its batch (it runs at full width)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean), validate_args=False)

    def value(self, features: Tensor) -> Tensor:
        return self.critic(self.norm(features)).squeeze(-1)


def _choices(fractions, full: int) -> Tuple[int, ...]:
    return tuple(sorted({max(1, math.ceil(f * full)) for f in fractions}))


@register
class Prance(Reduction, nn.Module):
    """PRANCE: a selector picks channels and tokens per image and stage (see the module doc)."""

    name = "prance"

    def __init__(self, strategy=None, channels=None, stages=4, weights=None, subnet=None, state=None,
                 random=False, seed=0):
        nn.Module.__init__(self)
        if not isinstance(random, bool):
            raise OptionError(f"prance: random must be true or false, got {random!r}")
        if random and (weights or subnet):
            raise OptionError("prance: random=true draws every choice at random: give no weights= nor subnet=")
        # random=true: per image and stage, every choice uniform over its options (seeded), no
        # selector network: PRANCE's own random floor, on any channel-elastic ViT
        self.random = random
        self.generator = torch.Generator().manual_seed(check_int("prance", "seed", seed, high=2**63 - 1))
        # strategy and channels default to what the selector weights were trained with (else
        # prune, with channels): adapt(model, "prance", weights=NAME) needs nothing else
        self.strategy_option, self.channels_option, self.state_option = strategy, channels, state
        self.weights, self.subnet = weights, subnet
        if subnet is not None and subnet not in SUBNETS:
            raise OptionError(f"prance: subnet must be one of {', '.join(SUBNETS)} (or unset for the selector), got {subnet!r}")
        self.n_stages = check_int("prance", "stages", stages, low=2)
        # every image runs this (sub-network training): one choice for every stage, or a tuple of
        # one per later stage (stage 0 always runs at full width)
        self.fixed: Optional[Union[StageChoice, Tuple[StageChoice, ...]]] = None
        # selector training: sample actions and record a rollout in which, after each decision,
        # the network is finished at full width from there (Result-to-Go)
        self.sampling = False
        self.rollout: List[dict] = []
        self.option_tensors: Dict[tuple, Tensor] = {}  # to_choices' options, per dtype and device

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
        state = self.state_option if self.state_option is not None else trained.get("state", "summary")
        if state not in SELECTOR_STATES:
            raise OptionError(f"prance: state must be one of {', '.join(SELECTOR_STATES)}, got {state!r}")
        self.strategy, self.channels, self.state_kind = strategy, channels, state
        mine = self.options_metadata()
        diff = {k: v for k, v in trained.items() if k in mine and mine[k] != v}
        if diff:
            raise OptionError(f"prance: the selector {self.weights} was trained with "
                              f"{' '.join(f'{k}={trained[k]}' for k in ('strategy', 'channels', 'stages', 'state') if k in trained)}; "
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
        if (self.channels or self.subnet is not None) and not info.channel_elastic:
            raise OptionError("prance: channels=true (and subnet=) slice attention heads and MLP neurons, which "
                              "only timm's Attention and plain Mlp allow; this model has others: pass channels=false")
        if info.depth < self.n_stages:
            raise OptionError(f"prance: {self.n_stages} stages need at least as many blocks, the model has {info.depth}")
        self.bounds = [round(i * info.depth / self.n_stages) for i in range(self.n_stages + 1)]
        self.head_options = _choices(HEAD_FRACTIONS, info.num_heads)
        self.mlp_options = _choices(MLP_FRACTIONS, info.mlp_hidden)
        self.full = StageChoice(info.num_heads, info.mlp_hidden)
        self.action_dim = (2 if self.channels else 0) + {"none": 0, "prune-merge": 2}.get(self.strategy, 1)
        state_dim = (2 if self.state_kind == "summary" else 1) * info.embed_dim
        self.selector = Selector(state_dim + self.n_stages, self.action_dim)
        if self.weights:
            load_weights(self, self.weights, "selector weights")
        if self.subnet is not None:
            self.fixed = self.subnetwork(self.subnet)

    def options_metadata(self) -> Dict[str, str]:
        """The options a selector is trained for, stored with its weights."""
        return dict(method=self.name, strategy=self.strategy, channels=str(self.channels).lower(),
                    stages=str(self.n_stages), state=self.state_kind)

    def subnetwork(self, which: str) -> StageChoice:
        """The largest, middle or smallest channel configuration (all tokens kept)."""
        i = {"largest": -1, "middle": None, "smallest": 0}[which]
        pick = (lambda o: o[len(o) // 2 - 1 if len(o) > 1 else 0]) if i is None else (lambda o: o[i])
        return StageChoice(pick(self.head_options), pick(self.mlp_options))

    def random_subnetwork(self, generator: torch.Generator, per_stage: bool = False):
        """A random channel configuration (all tokens kept): heads and MLP width drawn independently;
        with ``per_stage``, independently for every later stage too (a tuple of choices, as the
        selector picks them), else one choice shared by all stages."""
        def pick(options):
            return options[int(torch.randint(len(options), (1,), generator=generator))]

        def one():
            return StageChoice(pick(self.head_options), pick(self.mlp_options))
        return tuple(one() for _ in range(self.n_stages - 1)) if per_stage else one()

    def decision_layers(self):
        # tokens are reduced after the first attention of every later stage; state=keys also reads
        # the keys of the last block before each later stage
        layers = set(self.bounds[1:-1])
        if self.state_kind == "keys":
            layers |= {b - 1 for b in self.bounds[1:-1]}
        return sorted(layers)

    def action_bins(self) -> Tuple[int, ...]:
        """The number of options each action dimension picks from (in ``to_choices``' order)."""
        return ((len(self.head_options), len(self.mlp_options)) if self.channels else ()) + \
            {"none": (), "prune-merge": (len(KEEP_RATIOS),) * 2}.get(self.strategy, (len(KEEP_RATIOS),))

    def prepare_layers(self):
        return self.bounds[1:]  # before every later stage (choices), and before the head (depth)

    def stage_blocks(self, k: int) -> range:
        return range(self.bounds[k], self.bounds[k + 1])

    def begin(self, batch: int) -> None:
        self.rollout = []
        if self.random:
            start_forward_draws(self, self.generator)

    # --- decisions -------------------------------------------------------------------------
    def features(self, state: TokenState, k: int) -> Tensor:
        """The selector's view of each image's tokens before stage ``k``: [CLS ; mean patch ;
        stage one-hot ; fraction of the patches left] (no CLS token: the mean real token); with
        state=keys, [per-token mean of the last block's keys (``plan["keys"]``, see ``reduce``) ;
        stage one-hot ; fraction left]."""
        x, p = state.x, state.n_prefix
        patches = state.counts() - p
        stage = x.new_zeros(state.batch, self.n_stages - 1)
        stage[:, k - 1] = 1.0
        left = (patches / (self.info.n_tokens - p)).to(x.dtype)[:, None]
        if self.state_kind == "keys":
            return torch.cat([state.plan["keys"].to(x.dtype), stage, left], dim=1)
        if state.valid is None:
            mean = x[:, p:].mean(dim=1)
        else:
            mean = (x[:, p:] * state.valid[:, p:, None]).sum(dim=1) / patches[:, None]
        return torch.cat([state.summary(self.info.has_cls), mean, stage, left], dim=1)

    def mean_keys(self, state: TokenState, attn) -> Tensor:
        """(B, H * d) the per-token mean of the attention keys over each image's real tokens, its
        heads concatenated (zero for heads an image did not run)."""
        k = attn.k  # (B, h, N, d), padding included
        B, h, N, d = k.shape
        if self.info.num_heads * d != self.info.embed_dim:
            raise OptionError(f"prance: state=keys needs heads x head width = embedding width, got "
                              f"{self.info.num_heads} x {d} != {self.info.embed_dim}")
        if state.valid is None:
            mean = k.mean(dim=2)
        else:
            w = state.valid[:, None, :N, None].to(k.dtype)
            mean = (k * w).sum(dim=2) / state.counts().to(k.dtype)[:, None, None]
        return torch.nn.functional.pad(mean.flatten(1), (0, (self.info.num_heads - h) * d))

    def to_choices(self, actions: Tensor) -> Dict[str, Tensor]:
        """(B, action_dim) actions in [0, 1] -> per image: heads, hidden (long), keep, merge (float64)."""
        cols = iter(actions.unbind(dim=1))
        dev = actions.device

        def pick(options, dtype):
            a = next(cols).nan_to_num(nan=1.0)  # an image with NaN features: the full choice
            idx = (a.clamp(0, 1) * len(options)).long().clamp(max=len(options) - 1)
            return self._options_tensor(options, dtype, dev)[idx]

        def fixed(value, dtype):
            return torch.full((actions.shape[0],), value, dtype=dtype, device=dev)
        long, f64 = torch.long, torch.float64  # float64: floor(ratio * n) as Python computes it
        return dict(heads=pick(self.head_options, long) if self.channels else fixed(self.full.heads, long),
                    hidden=pick(self.mlp_options, long) if self.channels else fixed(self.full.hidden, long),
                    keep=pick(KEEP_RATIOS, f64) if self.strategy != "none" else fixed(1.0, f64),
                    merge=pick(KEEP_RATIOS, f64) if self.strategy == "prune-merge" else fixed(1.0, f64))

    def _options_tensor(self, options: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``options`` as a tensor, made once (a new tensor per pick cost a few operator calls each)."""
        key = (options, dtype, device)
        t = self.option_tensors.get(key)
        if t is None:
            with torch.inference_mode(False):  # usable in training forwards too
                t = self.option_tensors[key] = torch.tensor(options, dtype=dtype, device=device)
        return t

    def decide(self, state: TokenState, k: int) -> Tuple[Dict[str, Tensor], Optional[dict]]:
        """Per-image choices for stage ``k`` (and, when sampling, what the rollout records)."""
        if self.fixed is not None:
            f, b, dev = self.fixed, state.batch, state.x.device
            f = f[k - 1] if isinstance(f, tuple) else f
            return dict(heads=torch.full((b,), f.heads, device=dev), hidden=torch.full((b,), f.hidden, device=dev),
                        keep=torch.full((b,), f.keep, dtype=torch.float64, device=dev),
                        merge=torch.full((b,), f.merge, dtype=torch.float64, device=dev)), None
        if self.random:
            actions = torch.rand(state.batch, self.action_dim, generator=forward_generator(self, self.generator),
                                 dtype=torch.float64)
            return self.to_choices(actions.to(state.x.device)), None
        feats = self.features(state, k)
        if not self.sampling:  # greedy: the means
            return self.to_choices(self.selector.mean(feats)), None
        dist = self.selector.distribution(feats)
        actions = dist.sample()
        return self.to_choices(actions), dict(features=feats, actions=actions, logp=dist.log_prob(actions).sum(dim=-1))

    def prepare(self, runner, layer, state):
        """Before stage ``k``: record the stage just run (when sampling), then choose per image the
        stage's widths and keep ratios; they travel with the tokens (``heads``, ``hidden``, ``plan``)."""
        k = self.bounds.index(layer)  # the stage about to start; n_stages: the head
        if self.sampling and k > 1:
            self._record(runner, layer, state, k - 1)
        if k == self.n_stages:
            return state
        choice, record = self.decide(state, k)
        if self.fixed is None and not self.random:
            runner.note_macs(self.selector_macs())
        plan = dict(keep=choice["keep"], merge=choice["merge"], n_in=state.counts() - state.n_prefix)
        if self.sampling:
            plan.update(record, macs=self._macs_before(runner, state, k))
        return state.replace(heads=choice["heads"], hidden=choice["hidden"], plan=plan)

    def reduce(self, layer, state, attn):
        keys = self.mean_keys(state, attn) if self.state_kind == "keys" and layer + 1 in self.bounds[1:-1] else None
        if layer in self.bounds[1:-1]:
            state = self._reduce_tokens(state, attn)
        if keys is not None:  # for the selector before the next stage (features), with the tokens
            state = state.replace(plan={**(state.plan or {}), "keys": keys})
        return state

    def _reduce_tokens(self, state, attn):
        plan = state.plan
        if plan is None or self.strategy == "none" or bool((plan["keep"] >= 1.0).all() & (plan["merge"] >= 1.0).all()):
            return state
        p = state.n_prefix
        k = (plan["keep"] * (state.counts() - p)).floor().long().clamp(min=1)
        state, _ = sort_by_score(state, attn.cls_attn_mean[:, p:])
        if self.strategy == "merge":
            return merge_into_first(state, k)
        state = keep_first(state, k)
        if self.strategy == "prune":
            return state
        return merge_into_first(state, (plan["merge"] * k).floor().long().clamp(min=1))  # prune-merge

    # --- Result-to-Go (selector training) ----------------------------------------------------
    def _macs_before(self, runner, state: TokenState, k: int) -> Tensor:
        """(B,) block MACs per image of the stages before ``k``, as they ran."""
        if k == 1:
            n = self.info.n_tokens - self.info.n_prefix
            return torch.full((state.batch,), self._stage_macs(runner, 0, None, None, n, n), dtype=torch.float64)
        plan = state.plan
        n_out = (state.counts() - state.n_prefix).double().cpu()
        return plan["macs"] + self._stage_macs(runner, k - 1, state.heads.double().cpu(), state.hidden.double().cpu(),
                                               plan["n_in"].double().cpu(), n_out)

    def _record(self, runner, layer: int, state: TokenState, k: int) -> None:
        """One rollout step for stage ``k`` (just run): its decision, and (Result-to-Go) the
        prediction and block MACs of the network finished at full width from here."""
        p = state.n_prefix
        step = {key: state.plan[key] for key in ("features", "actions", "logp")}
        patches = (state.counts() - p).double().cpu()
        rest = sum(self._stage_macs(runner, s, None, None, patches, patches) for s in range(k + 1, self.n_stages))
        step.update(stage=k, rows=torch.arange(state.batch, device=state.x.device), kept=patches / (self.info.n_tokens - p),
                    block_macs=self._macs_before(runner, state, k + 1) + rest,
                    logits=runner.run(state.replace(heads=None, hidden=None, plan=None), start=layer, decide=False))
        self.rollout.append(step)

    def _stage_macs(self, runner, k: int, heads, hidden, n_in, n_out):
        """Block MACs of stage ``k`` per image (numbers or (B,) tensors): ``n_in`` patches at its
        first attention, ``n_out`` after the reduction, first ``heads``/``hidden`` widths."""
        from ..flops import block_macs
        p = self.info.n_prefix
        return sum(block_macs(runner.model.blocks[i], (n_in if i == self.bounds[k] else n_out) + p, n_out + p, heads, hidden)
                   for i in self.stage_blocks(k))

    def dense_block_macs(self, runner) -> float:
        n = self.info.n_tokens - self.info.n_prefix
        return float(sum(self._stage_macs(runner, k, None, None, n, n) for k in range(self.n_stages)))

    def selector_macs(self) -> int:
        from ..flops import linear_macs
        return linear_macs(self.selector.actor)

    def why_not_static(self):
        return "prance's selector chooses per-image widths and token counts: a ragged, packed batch"

    def extra_repr(self):
        fixed = f", subnet={self.subnet}" if self.subnet else ", random=true" if self.random else ""
        strategy = getattr(self, "strategy", self.strategy_option)  # resolved when bound
        channels = getattr(self, "channels", self.channels_option)
        return f"strategy={strategy}, channels={channels}, stages={self.n_stages}{fixed}" + \
            (f", weights={self.weights}" if self.weights else "")

