from typing import List, Sequence, Tuple, Union

from ..tokens import max_merge, merge_tokens
from .base import OptionError, Reduction, check_int, register


def tome_schedule(r: Union[int, Sequence[int], Tuple[int, float]], depth: int) -> List[int]:
    """Tokens merged per block: an int for every block, a per-block list (padded with 0), or
    ``(r, inflection)``, ToMe's linear schedule from ``r·(1-inflection)`` to ``r·(1+inflection)``."""
    if isinstance(r, (list,)) or (isinstance(r, tuple) and len(r) != 2):
        sched = [check_int("tome", "r", v) for v in r]
        if len(sched) > depth:
            raise OptionError(f"tome: r has {len(sched)} entries but the model has {depth} blocks")
        return sched + [0] * (depth - len(sched))
    inflection = 0.0
    if isinstance(r, tuple):
        r, inflection = r
        if not -1.0 <= float(inflection) <= 1.0:
            raise OptionError(f"tome: inflection must be in [-1, 1], got {inflection}")
    r = check_int("tome", "r", r)
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / max(depth - 1, 1)
    return [int(low + step * i) for i in range(depth)]


@register
class ToMe(Reduction):
    """Token Merging: merge r tokens in every block by bipartite soft matching on the keys."""

    name = "tome"

    def __init__(self, r=13):
        self.r = r
        if not isinstance(r, (list, tuple)):
            check_int("tome", "r", r)

    def bind(self, info):
        super().bind(info)
        self.schedule = tome_schedule(self.r, info.depth)

    def decision_layers(self):
        return [i for i, r in enumerate(self.schedule) if r > 0]

    def reduce(self, layer, state, attn):
        r = min(self.schedule[layer], max_merge(state.n_tokens, state.n_prefix))
        return merge_tokens(state, attn.key_mean, r)

    def extra_repr(self):
        return f"r={self.r!r}"
