"""Packed execution: a batch whose images differ (per-image token counts, or per-image widths
``TokenState.heads`` / ``hidden``) runs as one (T, C) matrix of its real tokens.

The rows are sorted so that the images of one width are one contiguous block: the token-wise work
(norms, qkv, proj, MLP) runs once per distinct width on a view, attention once per head count over
that group's images padded to its widest one. :class:`Layout` is that bookkeeping, :class:`Packed`
the tokens between two blocks, :class:`GroupedAttention` the attention a method reads from groups.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .methods.base import AttentionView, lazy
from .tokens import TokenState


class GroupedAttention(AttentionView):
    """An attention view of a batch whose attention ran in groups (head counts, padded spans):
    the batch's (B, H, N, d) q, k, v are assembled only if a method reads them."""

    def __init__(self, attended: list, state: TokenState, bias: Optional[Tensor], n_prefix: int):
        self.attended, self.shape = attended, (state.batch, state.x.shape[1])
        self.bias, self.n_prefix, self.heads = bias, n_prefix, state.heads

    def _assemble(self, part: int) -> Tensor:
        B, N = self.shape
        first = self.attended[0][part + 1]
        full = first.new_zeros(B, max(a[part + 1].shape[1] for a in self.attended), N, first.shape[-1])
        for g, *qkv in self.attended:
            t = qkv[part]
            full[g.images, :t.shape[1], :t.shape[2]] = t
        return full

    @lazy
    def q(self) -> Tensor:
        return self._assemble(0)

    @lazy
    def k(self) -> Tensor:
        return self._assemble(1)

    @lazy
    def v(self) -> Tensor:
        return self._assemble(2)


class Packed(NamedTuple):
    """A batch's real tokens packed by ``layout`` (attention order), between two blocks."""

    layout: "Layout"
    x: Tensor

    def unpack(self, state: TokenState) -> TokenState:
        return self.layout.unpack(state, self.x)


class Layout:
    """The real tokens of a batch whose images differ, packed into one (T, C) matrix; the way back
    to the (B, N, C) state; and which rows run which width.

    Rows are ordered image by image, the images sorted by their head count (attention order) or
    by their MLP width (MLP order), so that every width's rows are one contiguous block. When
    only one of the two varies per image, both orders are the same. Relies on compact states
    keeping each image's real tokens first (padding at the end). The bookkeeping runs on the host
    (numpy, one sync per layout: token counts and widths are shapes and weight slices), so a
    layout costs a few tensor copies instead of hundreds of tiny tensor ops."""

    def __init__(self, state: TokenState):
        self.valid, self.heads, self.hidden = state.valid, state.heads, state.hidden
        B, N = self.shape = tuple(state.x.shape[:2])
        self.device = state.x.device
        self.counts = state.counts()
        host = torch.stack([self.counts] + [w.to(self.counts.dtype) for w in (state.heads, state.hidden)
                                            if w is not None]).cpu().numpy()  # the host sync
        counts, widths = host[0], iter(host[1:])
        self.widths = {name: next(widths) if w is not None else None
                       for name, w in (("heads", state.heads), ("hidden", state.hidden))}
        by_heads, by_hidden = (_sorted_images(w) for w in self.widths.values())
        self.attention = _Rows(self, by_heads if by_heads is not None else by_hidden, counts)
        self.mlp = self.attention if by_hidden is None or by_heads is None else _Rows(self, by_hidden, counts)
        self._to_mlp = self._to_attention = self._bias = None
        if self.mlp is not self.attention:  # both vary: one gather per block each way
            self._to_mlp = self._tensor(self.attention.rows_of(self.mlp.flat))
            self._to_attention = self._tensor(self.mlp.rows_of(self.attention.flat))

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        return t if self.device.type == "cpu" else t.to(self.device)

    def attn_bias(self, state: TokenState) -> Optional[Tensor]:
        """``state.attn_bias()``, kept while the sizes of merged tokens are (the blocks between two
        decisions share it; the layout's validity is fixed)."""
        if self._bias is None or self._bias[0] is not state.size:
            self._bias = (state.size, state.attn_bias())
        return self._bias[1]

    def fits(self, state: TokenState) -> bool:
        return (state.valid is self.valid and state.heads is self.heads and state.hidden is self.hidden
                and tuple(state.x.shape[:2]) == self.shape)

    def attention_groups(self, static: Optional[int]) -> List["_Group"]:
        return self.attention.groups("heads", static)

    def mlp_groups(self, static: Optional[int]) -> List["_Group"]:
        return self.mlp.groups("hidden", static)

    def spans(self) -> Tensor:
        """(B,) the length each image's attention runs over (its head count's widest image)."""
        spans = torch.empty_like(self.counts)
        for g in self.attention_groups(None):
            spans[g.images] = g.span
        return spans

    def pack(self, x: Tensor, mlp_order: bool = False) -> Tensor:
        rows = self.mlp if mlp_order else self.attention
        flat = x.reshape(-1, x.shape[-1])
        return flat if rows.index is None else flat[rows.index]

    def to_mlp_order(self, x: Tensor) -> Tensor:
        return x if self._to_mlp is None else x[self._to_mlp]

    def to_attention_order(self, x: Tensor) -> Tensor:
        return x if self._to_attention is None else x[self._to_attention]

    def unpack(self, state: TokenState, x: Tensor) -> TokenState:
        """The state with the packed tokens ``x`` (attention order) back in its (B, N, C) ``x``."""
        B, N = self.shape
        index = self.attention.index
        if index is None:
            return state.replace(x=x.reshape(B, N, -1))
        out = x.new_zeros(B * N, x.shape[-1]).index_copy_(0, index, x)
        return state.replace(x=out.reshape(B, N, -1))


def _sorted_images(widths: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The images in order of their width (stable), or None when every image has the same."""
    if widths is None or (widths == widths[0]).all():
        return None
    return np.argsort(widths, kind="stable")


class _Rows:
    """One order of the packed rows: image by image, the images in the order ``images`` (None:
    0..B-1). ``flat`` (host) and ``index`` hold each row's flat position in the (B·N, C) state
    (``index`` None: the state's own layout, every token real and the images in order)."""

    def __init__(self, layout: Layout, images: Optional[np.ndarray], counts: np.ndarray):
        B, N = layout.shape
        self.layout = layout
        self.natural = images is None
        self.order = np.arange(B) if images is None else images
        self.counts = counts[self.order]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        # per row: the image's rank in this order, and the token's position in its image
        self.rank = np.repeat(np.arange(B), self.counts)
        self.pos = np.arange(self.starts[-1]) - self.starts[:-1][self.rank]
        self.flat = self.order[self.rank] * N + self.pos
        self.index = None if layout.valid is None and images is None else layout._tensor(self.flat)
        self.images = layout._tensor(self.order)
        self._groups = {}

    def rows_of(self, flat: np.ndarray) -> np.ndarray:
        """The rows of this order that hold the flat positions ``flat``."""
        rows = np.empty(self.layout.shape[0] * self.layout.shape[1], dtype=np.int64)
        rows[self.flat] = np.arange(len(self.flat))
        return rows[flat]

    def groups(self, name: str, static: Optional[int]) -> List["_Group"]:
        """The images of each distinct width of the layout's ``name`` ("heads" or "hidden"), as
        contiguous rows (``static``: the width when the state has none per image)."""
        key = name, static
        if key not in self._groups:
            widths = self.layout.widths[name]
            if widths is None:
                spans = [(static, 0, len(self.counts))]
            else:
                ordered = widths[self.order]
                cuts = [0] + [b for b in range(1, len(ordered)) if ordered[b] != ordered[b - 1]] + [len(ordered)]
                spans = [(int(ordered[a]), a, b) for a, b in zip(cuts, cuts[1:])]
            self._groups[key] = [_Group(self, w, a, b) for w, a, b in spans]
        return self._groups[key]


class _Group:
    """The images ``a``..``b`` of an order, which run one width: their rows ``start``..``end`` of
    the packed matrix, and for attention their positions ``local`` in the group's own padded
    (Bg, span) layout (None: the rows already are that layout, every image ``span`` long)."""

    def __init__(self, rows: _Rows, width: Optional[int], a: int, b: int):
        counts = rows.counts[a:b]
        self.width, self.start, self.end = width, int(rows.starts[a]), int(rows.starts[b])
        self.span, self.local = int(counts.max()), None
        self.images = rows.images if a == 0 and b == len(rows.counts) else rows.images[a:b]
        if counts.min() != self.span:
            r = slice(self.start, self.end)
            self.local = rows.layout._tensor((rows.rank[r] - a) * self.span + rows.pos[r])
        self._bias = None
        self.natural = rows.natural and a == 0 and b == len(rows.counts)  # all images, in order
        self.whole = self.natural and rows.index is None  # and every token real: the batch as it is

    def take(self, t: Tensor) -> Tensor:
        return t[self.start:self.end]

    def pad(self, t: Tensor) -> Tensor:
        """(T_g, D) -> (Bg, span, D), zeros at the padding."""
        if self.local is None:
            return t.reshape(len(self.images), self.span, -1)
        out = t.new_zeros(len(self.images) * self.span, t.shape[-1]).index_copy_(0, self.local, t)
        return out.reshape(len(self.images), self.span, -1)

    def unpad(self, t: Tensor) -> Tensor:
        t = t.reshape(-1, t.shape[-1])
        return t if self.local is None else t[self.local]

    def bias(self, bias: Optional[Tensor], size: Optional[Tensor]) -> Optional[Tensor]:
        """The group's rows of the batch's additive mask ``bias`` (made from the sizes ``size``),
        kept while those sizes are."""
        if bias is None:
            return None
        if self._bias is None or self._bias[0] is not size:
            self._bias = (size, bias[..., :self.span] if self.whole else bias[self.images][..., :self.span])
        return self._bias[1]
