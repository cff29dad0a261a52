import torch

from ..tokens import ceil_keep, keep_mask, keep_top
from .base import OptionError, Reduction, check_int, check_layers, check_rate, register


@register
class RandomDrop(Reduction):
    """Random pruning (the RL4EViT ablation).

    ``independent=True``: each patch is dropped with probability ``1 - keep_rate`` (per-image
    counts, a ragged batch); ``False``: exactly ``ceil(keep_rate * patches)`` random patches kept.
    ``schedule``: instead, a list of token counts (prefix included) after each block, random
    tokens kept: the cheapest possible execution of any method with these counts.
    """

    name = "random"

    def __init__(self, keep_rate=0.7, layers=(3, 6, 9), seed=0, independent=True, schedule=None):
        self.keep_rate = check_rate("random", "keep_rate", keep_rate)
        self.layers, self.independent, self.schedule = layers, bool(independent), schedule
        self.seed = check_int("random", "seed", seed)
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

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn):
        p, n = state.n_prefix, state.n_patches
        noise = torch.rand(state.batch, state.x.shape[1] - p, generator=self.generator).to(state.x.device)
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
        return f"keep_rate={self.keep_rate}, layers={self.layers}, independent={self.independent}, seed={self.seed}"
