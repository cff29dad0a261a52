import threading

import torch

from ..tokens import choose, keep_top, max_merge, merge_tokens
from .base import Reduction, check_int, check_layers, check_number, register

# one lock for every PPT's tally: held only for the few operations of an update
_TALLY_LOCK = threading.Lock()


@register
class PPT(Reduction):
    """PPT: per image and layer, prune inattentive tokens or pool (merge) similar ones.

    The policy is the unbiased variance of the ATS significance scores: below ``threshold`` the
    tokens are alike in importance, so pool; otherwise a few dominate, so prune. Both branches
    remove exactly ``r`` tokens, so in a mixed batch each image takes its own branch's result.

    ``threshold`` was set for 197 tokens (scores sum to 1, so their variance scales like
    1/(N-1)^2); ``threshold="scaled"`` uses 7e-5 * (196 / (N0 - 1))^2 for a model with N0 tokens.
    Both branches run on every image and each image takes its own with ``torch.where``: no host
    synchronisation and the same shapes every forward (compile, export). ``tally`` (one row per
    decision layer: images that pruned, images seen) stays on the device; only :meth:`stats` reads it.
    """

    name = "ppt"
    PAPER_THRESHOLD = 7e-5

    def __init__(self, r=50, layers=(3, 6, 9), threshold=7e-5):
        self.r = check_int("ppt", "r", r)
        self.layers = layers
        self.threshold_option = threshold
        self.tally = None

    def bind(self, info):
        super().bind(info)
        self.layers = check_layers("ppt", self.layers, info.depth)
        if self.threshold_option == "scaled":
            self.threshold = self.PAPER_THRESHOLD * (196 / (info.n_tokens - info.n_prefix)) ** 2
        else:
            self.threshold = check_number("ppt", "threshold", self.threshold_option, low=0.0)
        self.reset_stats()

    def reset_stats(self):
        self.tally = None if not hasattr(self, "info") else torch.zeros(len(self.layers), 2, dtype=torch.long)

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn):
        r = min(self.r, max_merge(state.n_tokens, state.n_prefix))
        if r == 0:
            return state
        scores = attn.significance
        prune = scores.var(dim=1, unbiased=True) >= self.threshold
        if not torch.compiler.is_exporting():  # an exported graph has no statistics to keep
            self._count(layer, prune)
        if not state.compact:  # masked execution (training) cannot merge: it runs only if every image prunes
            return keep_top(state, scores, state.n_patches - r) if bool(prune.all()) \
                else merge_tokens(state, attn.key_mean, r)
        # both branches on every image, each image takes its own (one batch, no split, no sync)
        return choose(prune, keep_top(state, scores, state.n_patches - r), merge_tokens(state, attn.key_mean, r))

    def _count(self, layer, prune):
        """Add the layer's (pruned, seen) images to the tally, on the device and out of place
        (a warm-up under ``leaves_no_trace`` gets the old tally back)."""
        row = torch.stack([prune.sum(), torch.ones_like(prune, dtype=torch.long).sum()])
        at = torch.full((1,), self.layers.index(layer), dtype=torch.long, device=prune.device)
        if torch.compiler.is_compiling():  # a compiled graph cannot hold a lock
            self.tally = self.tally.to(prune.device).index_add(0, at, row[None].to(self.tally.dtype))
            return
        with _TALLY_LOCK:  # forwards in several threads on one model: each adds to the latest tally
            tally = self.tally.to(prune.device)
            self.tally = tally.index_add(0, at, row[None].to(tally.dtype))

    def _counts(self):
        """{layer: (pruned, seen)} of the layers that saw images: the one host read of the tally."""
        if self.tally is None:
            return {}
        return {l: (int(p), int(n)) for l, (p, n) in zip(self.layers, self.tally.tolist()) if n}

    @property
    def prune_counts(self):
        return {l: p for l, (p, _) in self._counts().items()}

    @property
    def seen_counts(self):
        return {l: n for l, (_, n) in self._counts().items()}

    def prune_fraction(self):
        """{layer: fraction of images that chose pruning} since the last reset_stats()."""
        return {l: p / n for l, (p, n) in self._counts().items()}

    def stats(self):
        # under torchrun, evaluate averages each process's fractions weighted by its images; every
        # image passes every layer, so that is the summed tally's pruned / seen
        return {"prune_fraction_per_layer": self.prune_fraction()}

    def extra_repr(self):
        return f"r={self.r}, layers={self.layers}, threshold={self.threshold_option}"
