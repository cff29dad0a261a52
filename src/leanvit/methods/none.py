from .base import Reduction, register


@register
class NoReduction(Reduction):
    """The dense model through leanvit's runtime (the baseline every method is compared with)."""

    name = "none"

    def decision_layers(self):
        return ()

    def reduce(self, layer, state, attn):
        return state
