"""RL4EViT: token pruning learned by multi-agent PPO (one agent per patch token).

Pruning layers sit before blocks 3, 6 and 9 (``placement="before"``, the paper's "following
DynamicViT" and the authors' code: the decision reads the output of block 2 and block 3 runs on the
kept tokens); ``placement="after"`` prunes after them (the decision reads the block's output and
the next block runs on the kept tokens). Every patch token is an agent; one shared actor reads the
token's feature and outputs keep/prune logits; one shared critic reads [token ; CLS]. Both are MLPs
with tanh (MAPPO's; or ``activation="relu"``) after a LayerNorm of their input (MAPPO's feature
normalisation; ``input_norm=false``: none), hidden widths
``[4C, 256, 64]`` by default (the authors' for DeiT-S) or ``hidden=[64]`` for a cheap actor.
The options a policy was trained with are stored in its weights file's metadata and are its
defaults when it is loaded; a file that stores none is refused (nothing says how to run it).
Inference is greedy and removes the pruned tokens for real: per-image counts, a ragged batch that
the runtime runs packed (no padding in the token-wise work). Training samples actions and runs masked (``LeanViT.masked``) so the batch
keeps its shape and every token keeps its position, which lines agents up across layers for GAE.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..tokens import keep_mask
from .base import OptionError, Reduction, check_layers, load_weights, register


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
PLACEMENTS = ("before", "after")
OPTIONS = ("layers", "hidden", "agents", "placement", "activation", "input_norm")  # stored with the weights


# sizes of a policy network, checked before anything is allocated (options come from users and files)
MAX_WIDTH = 1 << 16
MAX_PARAMETERS = 1 << 27


def mlp_parameters(sizes: Sequence[int]) -> int:
    """The parameters of ``mlp(sizes)``'s linear layers."""
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def _metadata_value(meta: Dict[str, str], key: str, weights: str):
    """One option stored (as JSON) in a policy file's metadata; bad JSON names the file and the key."""
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise OptionError(f"rl4evit: the policy {weights} stores {key}={meta[key][:60]!r} in its metadata, "
                          f"which is not JSON ({e}); the file is damaged: train it again") from None


def mlp(sizes: Sequence[int], activation: str = "relu", input_norm: bool = False) -> nn.Sequential:
    """Linear layers with ``activation`` between them (ReLU by default: PRANCE's selector uses it too);
    ``input_norm``: a LayerNorm of the input first (MAPPO's feature normalisation)."""
    layers: List[nn.Module] = [nn.LayerNorm(sizes[0])] if input_norm else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


R2_TO = ("kept", "alive")


def agent_rewards(kept: Tensor, alive: Tensor, correct: Tensor, alpha: float, beta: float,
                  r2_to: str = "kept") -> Tensor:
    """The paper's equations 1-2 for every agent at every pruning layer.

    kept, alive: (T, B, P) bool: the agent's action (keep) and whether the agent acted at that
    layer (its token was still there). correct: (B,) the image's accuracy signal γ: bool (the
    paper's: the final prediction is right) or a number in [0, 1] (agreement with the dense model,
    exp(-KL to it)). ``R = alpha * r1 + beta * r2`` with r1 = -1 if kept else 0 and r2 = γ / n_l,
    n_l the tokens kept at layer l. r2 goes to the agents that kept their token (``r2_to="kept"``:
    the paper "amortizes the accuracy gain to each preserved token", and the authors' code pays it
    to the live agents only), or to every agent that acted (``"alive"``, under which keeping and
    pruning earn the same r2, so nothing but later layers' rewards pays for keeping and the last
    pruning layer keeps almost nothing). Agents that did not
    act get 0.
    """
    if r2_to not in R2_TO:
        raise ValueError(f"r2_to must be one of {R2_TO}, got {r2_to!r}")
    r1 = -kept.to(torch.float32)
    n_kept = (kept & alive).sum(dim=2, keepdim=True).clamp_min(1).to(torch.float32)
    r2 = correct.to(torch.float32)[None, :, None] / n_kept
    if r2_to == "kept":
        r2 = r2 * kept
    return (alpha * r1 + beta * r2) * alive


@register
class RL4EViT(Reduction, nn.Module):
    """RL4EViT: multi-agent PPO token pruning, one agent per patch token, greedy at inference."""

    name = "rl4evit"
    position = "block"  # a decision before block l sits after block l - 1

    # None: what the weights were trained with (their metadata), else the default
    def __init__(self, layers=None, hidden=None, weights=None, agents=None, placement=None, activation=None,
                 input_norm=None):
        nn.Module.__init__(self)
        self.weights = weights
        self.given = dict(layers=layers, hidden=hidden, agents=agents, placement=placement, activation=activation,
                          input_norm=input_norm)
        self._check(self.given)
        self.sampling = False  # True during training rollouts: sample actions and record them
        self.rollout: List[dict] = []

    @staticmethod
    def _check(o: dict) -> None:
        if o["agents"] not in (None, "multi", "single"):
            raise OptionError(f"rl4evit: agents must be 'multi' (one per token) or 'single' (one per layer), got {o['agents']!r}")
        hidden = o["hidden"]
        if hidden is not None and (not isinstance(hidden, (list, tuple)) or not hidden or not all(
                isinstance(h, int) and not isinstance(h, bool) and 0 < h <= MAX_WIDTH for h in hidden)):
            raise OptionError(f"rl4evit: hidden must be a list of layer widths (integers in 1..{MAX_WIDTH}), "
                              f"got {hidden!r}")
        if o["placement"] not in (None, *PLACEMENTS):
            raise OptionError(f"rl4evit: placement must be 'before' (the paper's) or 'after' the pruning blocks, "
                              f"got {o['placement']!r}")
        if o["activation"] not in (None, *ACTIVATIONS):
            raise OptionError(f"rl4evit: activation must be one of {', '.join(ACTIVATIONS)}, got {o['activation']!r}")
        if o["input_norm"] not in (None, True, False):
            raise OptionError(f"rl4evit: input_norm must be true or false, got {o['input_norm']!r}")

    def _trained_options(self) -> Optional[Dict[str, object]]:
        """The options stored with the weights; None when the file stores none."""
        from safetensors import safe_open
        from ..zoo import method_weights_path
        try:
            with safe_open(method_weights_path(self.weights, self.name), "pt") as f:
                meta = f.metadata() or {}
        except Exception:
            return {}  # missing or unreadable: load_weights says so
        if "placement" not in meta:
            return None
        # the first policies that stored their options had no input norm and do not say so
        return {"input_norm": False, **{k: _metadata_value(meta, k, self.weights) for k in OPTIONS if k in meta}}

    def bind(self, info):
        super().bind(info)
        trained = self._trained_options() if self.weights else {}
        defaults = dict(layers=(3, 6, 9), hidden=None, agents="multi", placement="before", activation="tanh",
                        input_norm=True)
        if trained is None:
            raise OptionError(f"rl4evit: the policy {self.weights} stores none of the options it was trained with "
                              "(layers, placement, activation, ...), so nothing says how to run it: train it again")
        self._check({**defaults, **trained})
        opts = {k: v if v is not None else trained.get(k, defaults[k]) for k, v in self.given.items()}
        opts["layers"] = check_layers("rl4evit", opts["layers"], info.depth)
        c = info.embed_dim
        opts["hidden"] = list(opts["hidden"]) if opts["hidden"] else [4 * c, 256, 64]  # DeiT-S: 384-1536-256-64-2
        size = mlp_parameters([2 * c, *opts["hidden"], 1])  # the critic, the larger network: checked before it exists
        if size > MAX_PARAMETERS:
            raise OptionError(f"rl4evit: hidden={_plain(opts['hidden'])} makes a critic of {size:,} parameters, over "
                              f"the {MAX_PARAMETERS:,} leanvit builds; pass smaller widths")
        diff = [k for k, v in trained.items() if k in opts and _plain(v) != _plain(opts[k])]
        if diff:
            raise OptionError(f"rl4evit: the policy {self.weights} was trained with "
                              f"{' '.join(f'{k}={_plain(trained[k])}' for k in diff)}; got "
                              f"{' '.join(f'{k}={_plain(opts[k])}' for k in diff)}")
        self.layers, self.hidden, self.agents = opts["layers"], opts["hidden"], opts["agents"]
        self.placement, self.activation, self.input_norm = opts["placement"], opts["activation"], opts["input_norm"]
        if self.placement == "before" and self.layers[0] < 1:
            raise OptionError("rl4evit: placement=before prunes before blocks 1..depth-1 (there is none before block 0)")
        # the residual stream is not normalised (token norms ~70 on the reference model): without the
        # input LayerNorm the first tanh layer saturates
        self.actor = mlp([c, *self.hidden, 2], self.activation, self.input_norm)
        self.critic = mlp([2 * c, *self.hidden, 1], self.activation, self.input_norm)  # DeiT-S: 768-1536-256-64-1
        if self.weights:
            load_weights(self, self.weights, "policy weights")

    def options_metadata(self) -> Dict[str, str]:
        """The options a policy is trained with, stored with its weights (JSON values)."""
        return dict(method=self.name, **{k: json.dumps(_plain(getattr(self, k))) for k in OPTIONS})

    def decision_layers(self):
        return [l - 1 for l in self.layers] if self.placement == "before" else list(self.layers)

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
            if self.sampling:  # that agent kept its token: PPO learns from the action that ran
                step = self.rollout[-1]
                step["action"] = torch.where(keep, torch.ones_like(action), action)
                step["logp"] = dist.log_prob(step["action"])
        if self.sampling:
            self.rollout[-1]["kept"] = keep  # what happened, including that fallback
        return keep_mask(state, keep)

    def why_not_static(self):
        return "rl4evit's agents keep a per-image number of tokens: a ragged batch"

    def extra_repr(self):
        if not hasattr(self, "placement"):  # not bound yet
            return f"weights={self.weights}" if self.weights else ""
        return f"layers={self.layers}, placement={self.placement}, agents={self.agents}" + \
            (f", weights={self.weights}" if self.weights else "")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
