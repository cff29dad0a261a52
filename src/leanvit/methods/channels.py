from .base import OptionError, Reduction, register


def _per_block(name: str, value, full: int, depth: int):
    """An int count, a float fraction of ``full``, or a per-block list of either -> per-block ints."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise OptionError(f"channels: {name} needs one entry per block ({depth}), got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OptionError(f"channels: {name} entries must be counts or fractions, got {v!r}")
        n = round(v * full) if isinstance(v, float) else v
        if not 1 <= n <= full:
            raise OptionError(f"channels: {name} must be in 1..{full} (or a fraction in (0, 1]), got {v!r}")
        out.append(int(n))
    return out


@register
class Channels(Reduction):
    """Static channel slimming: every block runs its first k heads and MLP neurons (no token reduction)."""

    name = "channels"

    def __init__(self, heads=1.0, mlp=1.0):
        self.heads_option, self.mlp_option = heads, mlp

    def bind(self, info):
        super().bind(info)
        self.heads = _per_block("heads", self.heads_option, info.num_heads, info.depth)
        self.mlp = _per_block("mlp", self.mlp_option, info.mlp_hidden, info.depth)

    def decision_layers(self):
        return ()

    def block_widths(self, layer):
        return self.heads[layer], self.mlp[layer]

    def reduce(self, layer, state, attn):
        return state

    def extra_repr(self):
        return f"heads={self.heads_option}, mlp={self.mlp_option}"
