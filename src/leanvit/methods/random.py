import torch

from ..tokens import ceil_keep, keep_mask, keep_top
from .base import (OptionError, Reduction, check_int, check_layers, check_rate, forward_generator, register,
                   start_forward_draws)


@register
class RandomDrop(Reduction):
    """Random pruning (the RL4EViT ablation).

    ``independent=True``: each patch is dropped with probability ``1 - keep_rate`` (per-image
    counts, a ragged batch); ``False``: exactly ``ceil(keep_rate * patches)`` random patches kept.
    ``schedule``: instead, a list of token counts (prefix included) after each block, random
    tokens kept: the cheapest possible execution of any method with these counts.
    ``fixed=True``: static, for compile and export: exact counts (``keep_rate`` or ``schedule``),
    the patches kept ranked by a table of noise drawn once from ``seed`` (per decision layer, kept
    on the tokens' device), the same for every image and forward. Otherwise fresh noise on the host
    every forward, from a generator of its own seeded from ``seed``'s stream (forwards in several
    threads on one model each draw a whole sequence).
    """

    name = "random"

    def __init__(self, keep_rate=0.7, layers=(3, 6, 9), seed=0, independent=None, schedule=None, fixed=False):
        self.keep_rate = check_rate("random", "keep_rate", keep_rate)
        if not isinstance(fixed, bool):
            raise OptionError(f"random: fixed must be true or false, got {fixed!r}")
        if fixed and independent:
            raise OptionError("random: fixed=true keeps exact counts; it cannot be combined with independent=true")
        independent = not fixed if independent is None else independent
        self.layers, self.independent, self.schedule, self.fixed = layers, bool(independent), schedule, fixed
        self.seed = check_int("random", "seed", seed, high=2**63 - 1)
        self.generator = torch.Generator().manual_seed(self.seed)

    def bind(self, info):
        super().bind(info)
        if self.schedule is not None:
            sched = [check_int("random", "schedule", n, low=info.n_prefix + 1) for n in self.schedule]
            if len(sched) != info.depth:
                raise OptionError(f"random: schedule needs one token count per block ({info.depth}), got {len(sched)}")
            self.schedule = sched
            before = [info.n_tokens] + sched[:-1]
            self.layers = tuple(i for i in range(info.depth) if sched[i] < before[i])
        else:
            self.layers = check_layers("random", self.layers, info.depth)
        if self.fixed:  # one row of noise per decision layer, as long as the input's patches
            g = torch.Generator().manual_seed(self.seed)
            self.table = torch.rand(len(self.layers), info.n_tokens - info.n_prefix, generator=g)

    def decision_layers(self):
        return self.layers

    def begin(self, batch: int) -> None:
        if not self.fixed:
            start_forward_draws(self, self.generator)

    def why_not_static(self):
        if self.fixed:
            return None
        return "random draws fresh noise on the host every forward" + \
            (" and keeps per-image counts (independent=true)" if self.independent else "") + "; use fixed=true"

    def _fixed_noise(self, layer, n, device):
        """The layer's row of the noise table (drawn at bind on the host, so the same on every
        device), moved once to the tokens' device: a constant of the compiled or exported graph."""
        if self.table.device != device:
            self.table = self.table.to(device)
        return self.table[self.layers.index(layer), :n]

    def reduce(self, layer, state, attn):
        p, n = state.n_prefix, state.n_patches
        if self.fixed:
            noise = self._fixed_noise(layer, state.x.shape[1] - p, state.x.device).expand(state.batch, -1)
        else:
            noise = torch.rand(state.batch, state.x.shape[1] - p, generator=forward_generator(self, self.generator))
            noise = noise.to(state.x.device)
        if self.schedule is not None:
            k = self.schedule[layer] - p
            return state if k >= n else keep_top(state, noise, k)
        if not self.independent:
            return keep_top(state, noise, ceil_keep(self.keep_rate, n))
        alive = torch.ones_like(noise, dtype=torch.bool) if state.valid is None else state.valid[:, p:]
        keep = (noise < self.keep_rate) & alive
        empty = ~keep.any(dim=1)  # every image keeps at least one patch: its first live one
        keep[empty, alive[empty].float().argmax(dim=1)] = True
        return keep_mask(state, keep)

    def extra_repr(self):
        if self.schedule is not None:
            return f"schedule={self.schedule}"
        return f"keep_rate={self.keep_rate}, layers={self.layers}, independent={self.independent}, seed={self.seed}" \
            + (", fixed=True" if self.fixed else "")
