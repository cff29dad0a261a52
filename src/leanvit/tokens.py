"""The token state every method works on, and the pure tensor operations that reduce it.

All operations return a new :class:`TokenState`; every per-token tensor (features, sizes,
validity, sources) goes through the same index, so bookkeeping cannot drift from features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class TokenState:
    """Tokens of a batch between two blocks.

    x:        (B, N, C) features. The first ``n_prefix`` tokens (CLS, distillation, register
              tokens) are never pruned or merged and always stay in front, in their order.
    size:     (B, N) how many input tokens each token stands for; ``None`` while all are 1.
              Attention adds ``log(size)`` to its logits (proportional attention).
    valid:    (B, N) bool, ``None`` while every token is real. Ragged batches (per-image token
              counts) are padded to the batch maximum; padding is masked out of attention.
    source:   (B, N, N0) 0/1 map of which input tokens each token stands for; only when tracking.
    compact:  False for masked execution (training with a fixed batch shape): pruned tokens stay
              in place, marked invalid, so attention ignores them exactly as if removed.
    policy:   (B, N) differentiable keep decisions in [0, 1] (DynamicViT's training): attention
              weights are multiplied by them, so gradients reach the decisions.
    heads:    (B,) long, first-k attention heads each image runs with (per-image channel widths,
              PRANCE); ``None``: the method's static widths for every image.
    hidden:   (B,) long, first-k MLP neurons each image runs with; ``None`` as for ``heads``.
    rope:     (B, N, 2·d) each token's rotary position table row (sin ; cos), for models with
              rotary position embeddings (EVA-02, RoPE ViTs); ``None`` otherwise. It travels with its
              token: a merged token keeps its destination's row; prefix tokens and EViT's fused
              token, which stand at no position, carry the identity rotation (sin 0, cos 1).
    plan:     a method's per-image decisions (tensors with the batch first) that later layers of
              the same forward carry out (PRANCE: keep ratios chosen before a stage, applied after
              its first attention). Carried with the tokens, so methods keep no per-forward state.

    In compact execution each image's real tokens are its first ``counts()[i]`` (padding is at the
    end): the runtime relies on it to pack the real tokens of a ragged batch.
    """

    x: Tensor
    n_prefix: int
    size: Optional[Tensor] = None
    valid: Optional[Tensor] = None
    source: Optional[Tensor] = None
    compact: bool = True
    policy: Optional[Tensor] = None
    heads: Optional[Tensor] = None
    hidden: Optional[Tensor] = None
    plan: Optional[Dict[str, Tensor]] = None
    rope: Optional[Tensor] = None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def n_patches(self) -> int:
        """Reducible tokens per image: the most any image has (padding included when ragged)."""
        if self.compact or self.valid is None:
            return self.x.shape[1] - self.n_prefix
        return int(self.valid[:, self.n_prefix:].sum(1).max())

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def replace(self, **changes) -> "TokenState":
        unknown = changes.keys() - self.__dict__.keys()
        if unknown:
            raise TypeError(f"TokenState has no field(s) {sorted(unknown)}")
        new = object.__new__(TokenState)  # dataclasses.replace re-runs __init__: 5x slower, every block
        new.__dict__.update(self.__dict__, **changes)
        return new

    def counts(self) -> Tensor:
        """(B,) real tokens per image."""
        if self.valid is None:
            return torch.full((self.batch,), self.n_tokens, dtype=torch.long, device=self.x.device)
        return self.valid.sum(1)

    def attn_bias(self) -> Optional[Tensor]:
        """Additive (B, 1, 1, N) attention mask: log-size of each key, -inf for padding."""
        bias = None
        if self.size is not None:
            bias = self.size.log().to(self.x.dtype)
        if self.valid is not None:
            bias = torch.zeros_like(self.x[..., 0]) if bias is None else bias
            bias = bias.masked_fill(~self.valid, float("-inf"))
        return None if bias is None else bias[:, None, None, :]

    def sizes(self) -> Tensor:
        """(B, N) sizes, materialised."""
        return self.size if self.size is not None else self.x.new_ones(self.x.shape[:2])

    def summary(self, has_cls: bool) -> Tensor:
        """(B, C) one token summing up each image: the CLS token, or for a model without one the
        mean of the image's real tokens (what PRANCE's and RL4EViT's features read as "CLS")."""
        if has_cls:
            return self.x[:, 0]
        if self.valid is None:
            return self.x.mean(dim=1)
        w = self.valid[..., None].to(self.x.dtype)
        return (self.x * w).sum(dim=1) / w.sum(dim=1)

    # --- re-indexing -------------------------------------------------------------------------
    def gather(self, idx: Tensor) -> "TokenState":
        """Keep tokens ``idx`` (B, K), in that order."""
        return self.replace(
            x=_take(self.x, idx),
            size=None if self.size is None else self.size.gather(1, idx),
            valid=None if self.valid is None else self.valid.gather(1, idx),
            policy=None if self.policy is None else self.policy.gather(1, idx),
            source=None if self.source is None else _take(self.source, idx),
            rope=None if self.rope is None else _take(self.rope, idx),
        )


def _expand_index(idx: Tensor, t: Tensor) -> Tensor:
    """(B, K) token indices expanded to index dim 1 of a (B, N, ...) tensor."""
    return idx.reshape(idx.shape + (1,) * (t.dim() - 2)).expand(idx.shape + t.shape[2:])


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Gather along dim 1 of a (B, N, ...) tensor with (B, K) indices."""
    return t.gather(1, _expand_index(idx, t))


# --- pruning --------------------------------------------------------------------------------
def keep_top(state: TokenState, scores: Tensor, k: int) -> TokenState:
    """Keep the prefix and the ``k`` patches with the highest ``scores`` (B, n_patches).

    Survivors are ordered by descending score after the prefix, as EViT and PPT do (later
    bipartite splits depend on token order).
    """
    p = state.n_prefix
    if state.valid is not None:  # padding never survives
        scores = scores.masked_fill(~state.valid[:, p:], float("-inf"))
    top = scores.topk(k, dim=1, largest=True, sorted=True).indices
    if not state.compact:
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        return keep_mask(state, keep)
    top = top + p
    prefix = torch.arange(p, device=top.device).expand(state.batch, p)
    return state.gather(torch.cat([prefix, top], dim=1))


def keep_mask(state: TokenState, keep: Tensor) -> TokenState:
    """Keep, per image, the patches where ``keep`` (B, n_patches) is True (ragged result).

    Kept tokens stay in their order; images with fewer tokens are padded to the batch maximum.
    """
    p = state.n_prefix
    if state.valid is not None:
        keep = keep & state.valid[:, p:]
    full = torch.cat([keep.new_ones(state.batch, p), keep], dim=1)
    if not state.compact:
        return state.replace(valid=full)
    counts = full.sum(1)
    width = int(counts.max())
    # stable sort puts kept tokens first, in their original order
    order = torch.sort((~full).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    out = state.gather(order)
    if bool((counts == width).all()):
        return out.replace(valid=None)
    valid = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    return out.replace(valid=valid)


def fuse_rest(state: TokenState, scores: Tensor, k: int) -> TokenState:
    """EViT: keep the top ``k`` patches; the others become one extra token, their sum weighted by
    ``scores`` (not renormalised, as in EViT). The fused token counts as an ordinary token (size 1)
    but its source is every patch it absorbed."""
    if state.valid is not None:
        raise ValueError("EViT fusion on a ragged batch is not supported")
    p = state.n_prefix
    order = scores.argsort(dim=1, descending=True) + p
    kept, dropped = order[:, :k], order[:, k:]
    prefix = torch.arange(p, device=order.device).expand(state.batch, p)
    out = state.gather(torch.cat([prefix, kept], dim=1))
    w = scores.gather(1, dropped - p)
    fused = (_take(state.x, dropped) * w[..., None]).sum(1, keepdim=True)
    size = None if out.size is None else torch.cat([out.size, out.size.new_ones(state.batch, 1)], 1)
    rope = None if out.rope is None else torch.cat([out.rope, identity_rope(out.rope[:, :1])], 1)
    source = None
    if state.source is not None:
        source = torch.cat([out.source, _take(state.source, dropped).sum(1, keepdim=True)], 1)
    return out.replace(x=torch.cat([out.x, fused], dim=1), size=size, source=source, rope=rope)


# --- merging --------------------------------------------------------------------------------
def bipartite_soft_matching(metric: Tensor, r: int, n_prefix: int) -> Callable[[Tensor], Tensor]:
    """ToMe's bipartite soft matching over a (B, N, D) metric.

    Tokens alternate into A (even positions) and B (odd). Each A token picks its most similar B
    token (cosine); the ``r`` best-matched A tokens merge into their partners. Prefix tokens
    never merge away and never absorb. Returns ``merge(t)`` that applies the same merge (a sum)
    to any (B, N, ...) tensor; output order: prefix, unmerged A (index order), then B.
    """
    B, N = metric.shape[:2]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    pa, pb = (n_prefix + 1) // 2, n_prefix // 2  # prefix tokens that landed in A / in B
    # a mask, not an indexed assignment: it exports as one Where instead of two ScatterNDs
    prefix = (torch.arange(a.shape[1], device=metric.device)[:, None] < pa) \
        | (torch.arange(b.shape[1], device=metric.device)[None, :] < pb)
    scores = scores.masked_fill(prefix, float("-inf"))
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_a = edge_idx[:, r:].sort(dim=1).values[:, pa:]  # A's prefix sorts first (-inf), then index order
    src_a = edge_idx[:, :r]
    dst_b = node_idx.gather(1, src_a)
    # everything as positions in the full sequence (A_j = 2j, B_j = 2j+1), so one gather lays out
    # the output and one scatter-add folds the r sources into their destinations
    n_b = b.shape[1]
    dev = metric.device
    keep = torch.cat([torch.arange(n_prefix, device=dev).expand(B, n_prefix), 2 * unm_a,
                      (2 * torch.arange(pb, n_b, device=dev) + 1).expand(B, n_b - pb)], dim=1)
    src = 2 * src_a
    dst = n_prefix + unm_a.shape[1] + (dst_b - pb)  # a B token's position in the output

    def merge(t: Tensor) -> Tensor:
        out = _take(t, keep)
        return out.scatter_add_(1, _expand_index(dst, t), _take(t, src))

    merge.keep = keep  # each output token's own position: what a merged token keeps of its destination
    return merge


def merge_tokens(state: TokenState, metric: Tensor, r: int) -> TokenState:
    """Merge ``r`` tokens by bipartite soft matching, as a size-weighted average; sizes add."""
    if state.valid is not None:
        raise ValueError("merging on a ragged (padded) batch is not supported")
    if r <= 0:
        return state
    merge = bipartite_soft_matching(metric, r, state.n_prefix)
    size = state.sizes()
    x = merge(state.x if state.size is None else state.x * size[..., None])  # all sizes 1: skip the product
    size = merge(size)
    source = None if state.source is None else merge(state.source)
    rope = None if state.rope is None else _take(state.rope, merge.keep)
    return state.replace(x=x / size[..., None], size=size, source=source, rope=rope)


def sort_by_score(state: TokenState, scores: Tensor) -> Tuple[TokenState, Tensor]:
    """Each image's real patches in descending order of ``scores`` (B, n_patches), padding last
    (the prefix stays in front); and the scores in that order."""
    p = state.n_prefix
    if state.valid is not None:
        scores = scores.masked_fill(~state.valid[:, p:], float("-inf"))
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    prefix = torch.arange(p, device=order.device).expand(state.batch, p)
    return state.gather(torch.cat([prefix, order + p], dim=1)), scores


def keep_first(state: TokenState, k: Tensor) -> TokenState:
    """Keep the prefix and the first ``k[i]`` patches of image i (``k`` (B,) long, at most its
    patches): per-image counts, a ragged batch unless all ``k`` are equal."""
    p = state.n_prefix
    width = p + int(k.max())  # host sync: the batch's new width is a shape
    out = state.replace(**{f: t[:, :width] for f in ("x", "size", "valid", "policy", "source", "rope")
                           if (t := getattr(state, f)) is not None})
    valid = torch.arange(width, device=k.device)[None, :] < (p + k)[:, None]
    return out.replace(valid=None if bool(valid.all()) else valid)


def merge_into_first(state: TokenState, k: Tensor) -> TokenState:
    """PRANCE's merging, per image: its first ``k[i]`` patches (B,) are destinations (sort them
    first, see :func:`sort_by_score`); every other real patch joins its most similar destination
    (cosine on the hidden states) as a size-weighted average; sizes add."""
    p, n = state.n_prefix, state.x.shape[1] - state.n_prefix
    pos = torch.arange(n, device=k.device)[None, :]
    dst = pos < k[:, None]  # (B, n) destination patches
    src = ~dst if state.valid is None else ~dst & state.valid[:, p:]
    patches = state.x[:, p:]
    metric = patches / patches.norm(dim=-1, keepdim=True)
    # similarities only of the rows that may be sources to the columns that may be destinations
    lo, hi = int(k.min()), int(k.max())  # host sync: they are shapes
    sim = metric[:, lo:] @ metric[:, :hi].transpose(-1, -2)
    best = torch.cat([pos[:, :lo].expand(state.batch, lo),
                      sim.masked_fill(~dst[:, None, :hi], float("-inf")).argmax(dim=-1)], dim=1)
    target = torch.where(src, best, pos)  # a non-source (destination, padding) stays
    size = state.sizes()[:, p:]
    w = torch.where(src | dst, size, torch.zeros_like(size))  # padding adds nothing

    def merge(t: Tensor) -> Tensor:  # every patch folded into its target, sums
        return torch.zeros_like(t).scatter_add_(1, _expand_index(target, t), t)

    new_size = merge(w)
    x = merge(patches * w[..., None]) / new_size.clamp_min(1e-12)[..., None]
    merged = state.replace(
        x=torch.cat([state.x[:, :p], x], dim=1), size=torch.cat([state.sizes()[:, :p], new_size], dim=1),
        source=None if state.source is None else torch.cat(
            [state.source[:, :p], merge(state.source[:, p:] * (src | dst)[..., None])], dim=1))
    return keep_first(merged, k)


def choose(which: Tensor, a: TokenState, b: TokenState) -> TokenState:
    """Per image, ``a`` where ``which`` (B,) is True, else ``b``: two reductions of one batch to
    the same token count (PPT's prune and pool branches), without splitting the batch."""
    if a.x.shape != b.x.shape or a.valid is not None or b.valid is not None:
        raise ValueError("choose needs two reductions to the same token count, without padding")

    def pick(s: Optional[Tensor], t: Optional[Tensor]) -> Tensor:
        return torch.where(which.reshape((-1,) + (1,) * (s.dim() - 1)), s, t)
    sizes = None if a.size is None and b.size is None else pick(a.sizes(), b.sizes())
    source = None if a.source is None else pick(a.source, b.source)
    rope = None if a.rope is None else pick(a.rope, b.rope)
    return a.replace(x=pick(a.x, b.x), size=sizes, source=source, rope=rope)


def identity_rope(like: Tensor) -> Tensor:
    """Rotary table rows (sin ; cos) shaped like ``like`` that rotate by nothing: sin 0, cos 1."""
    half = like.shape[-1] // 2
    return torch.cat([torch.zeros_like(like[..., :half]), torch.ones_like(like[..., half:])], dim=-1)


def max_merge(n_tokens: int, n_prefix: int) -> int:
    """The most tokens one bipartite step can remove: half of the reducible ones."""
    return max((n_tokens - n_prefix) // 2, 0)


def ceil_keep(rate: float, n: int) -> int:
    return int(math.ceil(rate * n))
