from ..tokens import choose, keep_top, max_merge, merge_tokens
from .base import Reduction, check_int, check_layers, check_number, register


@register
class PPT(Reduction):
    """PPT: per image and layer, prune inattentive tokens or pool (merge) similar ones.

    The policy is the unbiased variance of the ATS significance scores: below ``threshold`` the
    tokens are alike in importance, so pool; otherwise a few dominate, so prune. Both branches
    remove exactly ``r`` tokens, so in a mixed batch each image takes its own branch's result.

    ``threshold`` was set for 197 tokens (scores sum to 1, so their variance scales like
    1/(N-1)^2); ``threshold="scaled"`` uses 7e-5 * (196 / (N0 - 1))^2 for a model with N0 tokens.
    ``prune_counts[layer]`` and ``seen_counts[layer]`` count the images that chose pruning.
    """

    name = "ppt"
    PAPER_THRESHOLD = 7e-5

    def __init__(self, r=50, layers=(3, 6, 9), threshold=7e-5):
        self.r = check_int("ppt", "r", r)
        self.layers = layers
        self.threshold_option = threshold
        self.reset_stats()

    def bind(self, info):
        super().bind(info)
        self.layers = check_layers("ppt", self.layers, info.depth)
        if self.threshold_option == "scaled":
            self.threshold = self.PAPER_THRESHOLD * (196 / (info.n_tokens - info.n_prefix)) ** 2
        else:
            self.threshold = check_number("ppt", "threshold", self.threshold_option, low=0.0)

    def reset_stats(self):
        self.prune_counts, self.seen_counts = {}, {}

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn):
        r = min(self.r, max_merge(state.n_tokens, state.n_prefix))
        if r == 0:
            return state
        scores = attn.significance
        prune = scores.var(dim=1, unbiased=True) >= self.threshold
        n_prune = int(prune.sum())  # host sync: statistics, and skipping a branch no image takes
        self.prune_counts[layer] = self.prune_counts.get(layer, 0) + n_prune
        self.seen_counts[layer] = self.seen_counts.get(layer, 0) + state.batch
        if n_prune == state.batch:
            return keep_top(state, scores, state.n_patches - r)
        if n_prune == 0:
            return merge_tokens(state, attn.key_mean, r)
        # a mixed batch: both branches on every image, each image takes its own (one batch, no split)
        return choose(prune, keep_top(state, scores, state.n_patches - r), merge_tokens(state, attn.key_mean, r))

    def prune_fraction(self):
        """{layer: fraction of images that chose pruning} since the last reset_stats()."""
        return {l: self.prune_counts[l] / self.seen_counts[l] for l in sorted(self.seen_counts)}

    def stats(self):
        return {"prune_fraction_per_layer": self.prune_fraction()}

    def extra_repr(self):
        return f"r={self.r}, layers={self.layers}, threshold={self.threshold_option}"
