from ..tokens import ceil_keep, fuse_rest, keep_top
from .base import OptionError, Reduction, check_layers, check_rate, register


@register
class EViT(Reduction):
    """EViT: keep the patches the CLS token attends to most; optionally fuse the rest into one."""

    name = "evit"

    def __init__(self, keep_rate=0.7, layers=(3, 6, 9), fuse=True):
        self.keep_rate = check_rate("evit", "keep_rate", keep_rate)
        if not isinstance(fuse, bool):
            raise OptionError(f"evit: fuse must be true or false, got {fuse!r}")
        self.layers, self.fuse = layers, fuse

    def bind(self, info):
        super().bind(info)
        self.layers = check_layers("evit", self.layers, info.depth)

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn):
        scores = attn.cls_attn_mean[:, state.n_prefix:]
        k = ceil_keep(self.keep_rate, state.n_patches)
        if k >= state.n_patches:
            return state
        if self.fuse:
            return fuse_rest(state, scores, k)
        return keep_top(state, scores, k)

    def extra_repr(self):
        return f"keep_rate={self.keep_rate}, layers={self.layers}, fuse={self.fuse}"
