import torch

from ..tokens import keep_mask
from .base import OptionError, Reduction, check_layers, register


@register
class ATS(Reduction):
    """Adaptive Token Sampling: inverse-transform sampling of the significance-score CDF.

    At each layer ``K-1`` evenly spaced points of the CDF pick patches; duplicates collapse, so
    every image keeps its own number of tokens (a ragged batch, padded to its maximum).
    ``tokens``: K-1 as a fraction of the current patches (float in (0, 1]) or a count (int).
    """

    name = "ats"

    def __init__(self, tokens=1.0, layers="3-"):
        self.tokens, self.layers = tokens, layers
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens <= 0 \
                or (isinstance(tokens, float) and tokens > 1):
            raise OptionError(f"ats: tokens must be a fraction in (0, 1] or a positive count, got {tokens!r}")

    def bind(self, info):
        super().bind(info)
        layers = self.layers
        if layers == "3-":  # the ATS paper's stages 3..11, for any depth
            layers = range(min(3, info.depth - 1), info.depth)
        self.layers = check_layers("ats", layers, info.depth)

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn):
        n = state.counts() - state.n_prefix  # (B,) each image's own patches
        most = int(n.max())  # the one host sync of the sampling (keep_mask has its own)
        if most <= 1:  # one patch left in every image: it stays, so skip the sampling's ops
            return state
        if isinstance(self.tokens, float):
            k = (self.tokens * n).round().long()
        else:
            k = n.clamp(max=int(self.tokens))
        k = k.clamp(min=1)  # even k = n drops tokens: likely ones are sampled several times
        scores = attn.significance
        if state.valid is not None:
            scores = scores * state.valid[:, state.n_prefix:]
        cdf = scores.cumsum(dim=1)
        cdf = cdf / cdf[:, -1:]
        # k <= n: a grid of the most patches holds every image's k points; the surplus ones repeat
        # the first point, which is picked anyway (no second sync for k.max())
        j = torch.arange(most, device=cdf.device)
        points = (j.to(cdf.dtype) + 0.5) / k[:, None]
        points = torch.where(j < k[:, None], points, points[:, :1])  # surplus points repeat the first
        picked = torch.searchsorted(cdf.contiguous(), points.contiguous(), right=True)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(1, picked.clamp_max(scores.shape[1] - 1), True)
        return keep_mask(state, keep)

    def why_not_static(self):
        return "ats keeps a per-image number of tokens (duplicate samples collapse): a ragged batch"

    def extra_repr(self):
        return f"tokens={self.tokens}, layers={self.layers}"
