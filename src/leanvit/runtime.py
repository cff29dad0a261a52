"""One block runner for any timm VisionTransformer (and EVA's ``Eva``: EVA-02, RoPE ViTs), with
decision points between attention and MLP.

Every block runs as timm's pre-norm ``Block`` does, with attention through
``F.scaled_dot_product_attention`` and an additive mask carrying the log-size of merged tokens
and the padding of ragged batches. At a method's decision layers the method sees the block's
attention and returns the reduced tokens, which the block's MLP and all later blocks run on.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer

from . import elastic
from .device import module_device
from .flops import attention_pool_macs
from .methods import OptionError, build_method  # the package: every method registered
from .methods.base import AttentionView, ModelInfo, Reduction
from .packing import GroupedAttention, Layout, Packed
from .support import (  # noqa: F401 (re-exported: leanvit.runtime is where users find them)
    SUPPORTED_POOLS, UNSUPPORTED_FAMILIES, UnsupportedModelError, attention_pool, check_images, check_supported,
    classify, layer_scale, mlp_hidden, policy_attention, pooled_from)
from .tokens import TokenState, identity_rope


class TokenOutput(NamedTuple):
    """The encoder's final tokens, as :meth:`LeanViT.forward_tokens` returns them.

    tokens: (B, N, C) after the final norm; prefix tokens (CLS, registers) first; padding zero.
    sizes:  (B, N) how many input tokens each token stands for (merged tokens: more than 1;
            EViT's fused token counts 1, as attention weighs it, its ``source`` is all it absorbed).
    valid:  (B, N) bool, the real tokens of a ragged batch (padding at the end); None: all real.
    source: (B, N, N0) 0/1, which input tokens (prefix, then the patch grid) each token stands
            for; None unless asked for.
    """

    tokens: Tensor
    sizes: Tensor
    valid: Optional[Tensor]
    source: Optional[Tensor]


class LeanViT(nn.Module):
    """A timm VisionTransformer run block by block with a token-reduction method plugged in.

    The wrapped model is shared, not copied or modified: it stays usable on its own.
    """

    def __init__(self, model: VisionTransformer, method: Reduction):
        super().__init__()
        check_supported(model)
        self.model = model
        self.method = method
        self.n_prefix = model.num_prefix_tokens
        method.bind(ModelInfo(
            depth=len(model.blocks), n_prefix=self.n_prefix,
            n_tokens=model.patch_embed.num_patches + self.n_prefix,
            num_heads=model.blocks[0].attn.num_heads if len(model.blocks) else 0,
            embed_dim=model.embed_dim, has_cls=model.cls_token is not None,
            mlp_hidden=mlp_hidden(model.blocks[0].mlp) if len(model.blocks) else 0,
            channel_elastic=all(elastic.sliceable(blk) for blk in model.blocks), model=model))
        if isinstance(method, nn.Module):  # a learned method's networks (built by bind) live where the model
            method.to(module_device(model), _floating_dtype(model))  # does, in its precision
        for i, blk in enumerate(model.blocks):
            widths = method.block_widths(i)
            if widths:
                elastic.check_sliceable(blk, i, *widths)
        if method.position not in ("attention", "block"):
            raise ValueError(f"{method!r}: position must be 'attention' or 'block', got {method.position!r}")
        layers = frozenset(method.decision_layers())
        self.decision_layers = layers if method.position == "attention" else frozenset()
        self.after_block_layers = layers if method.position == "block" else frozenset()
        self.prepare_layers = frozenset(method.prepare_layers())
        # blocks that can run as timm's own Block.forward when the tokens are plain (see _plain):
        # timm's Block with its fused attention (the SDPA call run_block makes), no decision in or
        # after it, full width
        self._timm_blocks = frozenset(
            i for i, blk in enumerate(model.blocks)
            if type(blk) is Block and blk.attn.fused_attn and i not in layers and not method.block_widths(i))
        self.track_source = False  # set True to record which input tokens each token stands for
        # True: pruning marks tokens invalid instead of removing them (training with a fixed batch
        # shape, as RL4EViT and DynamicViT train); merging methods cannot run masked
        self.masked = False
        self._trace: Optional[List[dict]] = None
        self._cached_layout: Optional[Layout] = None
        self.last_state: Optional[TokenState] = None  # final tokens of the last forward when tracing
        self.train(model.training)  # a wrapper of an eval-mode model starts in eval mode

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.model, "pretrained_cfg", {})

    # --- forward ---------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] == 0:
            check_images(self.model, images)
            return self.model(images)  # nothing to decide: timm's own (empty) output
        return self.run(self.embed(images))

    def run_blocks_tracking(self, images: Tensor, track_source: bool) -> TokenState:
        """The blocks on ``images``, recording which input patches each token stands for when
        ``track_source`` is set (or the runner tracks them anyway)."""
        old = self.track_source
        self.track_source = track_source or old
        try:
            return self.run_blocks(self.embed(images))
        finally:
            self.track_source = old

    def forward_tokens(self, images: Tensor, source: bool = False) -> "TokenOutput":
        """The encoder's final tokens, reduced by the method and normed as timm's
        ``forward_features`` returns them (with ``none``: exactly those). ``source=True`` also
        returns the patch-to-token map, which :meth:`unmerge` needs."""
        if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] == 0:
            check_images(self.model, images)
            x = self.model.forward_features(images)
            eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(0, -1, -1) if source else None
            return TokenOutput(x, x.new_ones(x.shape[:2]), None, eye)
        state = self.run_blocks_tracking(images, source)
        if self._trace is not None:
            self.last_state = state
        x, valid, src = self.model.norm(state.x), state.valid, state.source if source else None
        if valid is not None:  # padding rows: zeros, standing for nothing
            x = x.masked_fill(~valid[..., None], 0.0)
            src = None if src is None else src * valid[..., None]
        return TokenOutput(x, state.sizes(), valid, src)

    @staticmethod
    def unmerge(out: "TokenOutput", features: Optional[Tensor] = None) -> Tensor:
        """(B, N0, D) the tokens of ``out`` (or ``features`` (B, N, D) computed from them, e.g. by
        a projector) spread back over the input tokens: prefix tokens first, then the patch grid
        in raster order, each patch getting the token that stands for it. Pruned patches, which
        no token stands for, get zeros."""
        if out.source is None:
            raise ValueError("unmerge needs the patch-to-token map: call forward_tokens(images, source=True)")
        features = out.tokens if features is None else features
        if features.shape[:2] != out.source.shape[:2]:
            raise ValueError(f"features have {tuple(features.shape[:2])} (batch, tokens), "
                             f"the tokens {tuple(out.source.shape[:2])}")
        return out.source.transpose(1, 2).to(features.dtype) @ features

    def run(self, state: TokenState, start: int = 0, decide: bool = True) -> Tensor:
        """Blocks ``start``.. on ``state``, then the head. With ``decide=False`` the blocks run as
        the state says, without the method (a look-ahead, as PRANCE's Result-to-Go finishes the
        network from a stage on)."""
        state = self.run_blocks(state, start, decide)
        return self.finish(state) if decide else self.head(state)

    def run_blocks(self, state: TokenState, start: int = 0, decide: bool = True) -> TokenState:
        """Blocks ``start``.. on ``state`` (and the method's preparation before the head): the one
        loop over the blocks. Returns the final tokens, before the final norm."""
        blocks = self.model.blocks
        packed = None  # the tokens as the last block left them packed (state.x is then stale)
        for i in range(start, len(blocks) + 1):
            if decide and i in self.prepare_layers:
                state, packed = packed.unpack(state) if packed else state, None  # the method reads tokens
                state = self.method.prepare(self, i, state)
            if i < len(blocks):
                state, packed = self.run_block(i, blocks[i], state, decide, packed)
        return packed.unpack(state) if packed else state

    def finish(self, state: TokenState) -> Tensor:
        """The head's logits for the final tokens (kept as ``last_state`` when tracing)."""
        if self._trace is not None:
            self.last_state = state
            pool = getattr(self.model, "attn_pool", None)
            if pool is not None:  # a MAP head's cost depends on the tokens it pools
                p = self._pooled_from
                self.note_macs(attention_pool_macs(pool, state.counts() - p),
                               attention_pool_macs(pool, state.x.shape[1] - p))
        return self.head(state)

    def embed(self, images: Tensor) -> TokenState:
        check_images(self.model, images)
        m = self.model
        rope = None
        if isinstance(m, Eva):  # EVA's rotary table: one row per patch; prefix tokens rotate by nothing
            x, table = m._pos_embed(m.patch_embed(images))
            x = m.norm_pre(x)
            if table is not None:
                table = table.expand(x.shape[0], -1, -1)  # in its own dtype: timm rotates in it, then casts
                rope = torch.cat([identity_rope(table[:, :1]).expand(-1, self.n_prefix, -1), table], dim=1)
        else:
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        source = None
        if self.track_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        self.method.begin(x.shape[0])
        return TokenState(x=x, n_prefix=self.n_prefix, source=source, compact=not self.masked, rope=rope)

    def run_block(self, index: int, blk: Block, state: TokenState, decide: bool = True,
                  packed: Optional["Packed"] = None) -> Tuple[TokenState, Optional["Packed"]]:
        """timm's Block.forward, with the method's decision between attention and MLP (or after
        the block, for methods whose decision layers sit between blocks).

        A batch whose images differ runs packed (:mod:`leanvit.packing`; attention in one SDPA call
        per head count: a block-diagonal mask over all packed tokens would cost T² instead of the
        sum of the images' N², and per-image calls cost a call each). The packed tokens stay packed
        from block to block until a method reads them: then the block returns ``(state, packed)``
        with ``state.x`` stale and ``packed`` to unpack. Otherwise the batch runs as one (B, N, C)
        tensor, as timm runs it, and ``packed`` is None.
        """
        if packed is None and self._plain(index, state):
            # nothing of leanvit's in this block: timm's own Block.forward, without the per-call
            # bookkeeping below (at batch 1 on a tiny ViT it cost about 20% of the forward)
            return state.replace(x=blk(state.x)), None
        static = self.method.block_widths(index) or (None, None)  # static channel widths
        if packed is None:
            layout = self._layout(state)
            x = layout.pack(state.x) if layout else state.x
        else:
            layout, x = packed.layout, packed.x
        trace = self._trace is not None and decide  # a look-ahead is not what the forward ran
        counts_in = state.counts() if trace else None
        attn_run, attn_span = (layout.counts, layout.spans()) if layout and trace else (float(state.x.shape[1]),) * 2

        x, attended, bias = self._attention_residual(blk, state, layout, x, static[0])
        decided = None  # the state a decision in this block returned
        if decide and index in self.decision_layers:
            state = layout.unpack(state, x) if layout else state.replace(x=x)
            self._note_decision(index, state)
            state = decided = self.method.reduce(index, state, self._attention_view(attended, state, bias))
            layout = self._layout(state)
            x = layout.pack(state.x, mlp_order=True) if layout else state.x
        elif layout:
            x = layout.to_mlp_order(x)
        del attended  # free the attention buffers before the MLP allocates its own

        x = self._mlp_residual(blk, layout, x, static[1])
        packed = Packed(layout, layout.to_attention_order(x)) if layout else None
        if not layout:
            state = state.replace(x=x)
        if trace:
            record = dict(
                layer=index, attn_tokens=counts_in, mlp_tokens=state.counts(),
                heads=state.heads if state.heads is not None else static[0],
                hidden=state.hidden if state.hidden is not None else static[1],
                # what ran, padding included: tokens of the linear layers, and attention's span
                attn_run=attn_run, attn_span=attn_span,
                mlp_run=layout.counts if layout else float(state.x.shape[1]),
                tokens=self._tokens_of(decided))
            self._trace.append(record)
        if decide and index in self.after_block_layers:
            state, packed = packed.unpack(state) if packed else state, None
            self._note_decision(index, state)
            state = self.method.reduce(index, state, None)
            if trace:
                record["tokens"] = self._tokens_of(state)  # not _trace[-1]: the decision's cost came after it
        return state, packed

    def _attention_residual(self, blk: Block, state: TokenState, layout: Optional[Layout], x: Tensor,
                            heads: Optional[int]) -> Tuple[Tensor, list, Optional[Tensor]]:
        """``x`` plus the block's attention branch, one call per head count (``layout``'s groups, or
        the whole batch; ``heads``: the static head count). Also returns what each group attended,
        ``(group, q, k, v)``, for the method's view, and the additive mask."""
        h = blk.norm1(x)
        bias = layout.attn_bias(state) if layout else state.attn_bias()
        attended, outs = [], []  # (group, q, k, v) and the output rows per head count
        rope = state.rope if state.rope is None or not layout else layout.pack(state.rope)
        for g in layout.attention_groups(heads) if layout else [None]:
            width = heads if g is None else g.width
            hg = h if g is None else g.take(h)
            qkv, width = elastic.attention_projections(blk.attn, hg, width)
            q, k, v, o = self._attention(blk.attn, qkv if g is None else g.pad(qkv), width,
                                         bias if g is None else g.bias(bias, state.size), state.policy,
                                         rope if g is None or rope is None else g.pad(g.take(rope)))
            outs.append(self._attention_output(blk.attn, hg, o if g is None else g.unpad(o)))
            attended.append((g, q, k, v))
        x = x + blk.drop_path1(layer_scale(blk, 1, outs[0] if len(outs) == 1 else torch.cat(outs)))
        return x, attended, bias

    @staticmethod
    def _mlp_residual(blk: Block, layout: Optional[Layout], x: Tensor, hidden: Optional[int]) -> Tensor:
        """``x`` plus the block's MLP branch, one call per MLP width (``hidden``: the static one)."""
        h = blk.norm2(x)
        outs = [elastic.mlp_forward(blk.mlp, h if g is None else g.take(h), hidden if g is None else g.width)
                for g in (layout.mlp_groups(hidden) if layout else [None])]
        return x + blk.drop_path2(layer_scale(blk, 2, outs[0] if len(outs) == 1 else torch.cat(outs)))

    def _plain(self, index: int, state: TokenState) -> bool:
        """Whether block ``index`` on ``state`` is exactly timm's Block.forward on ``state.x``: one
        of ``_timm_blocks``, every token real and unmerged, no per-image widths, rotary table or
        differentiable policy, and not tracing (a trace records what ran)."""
        return (index in self._timm_blocks and self._trace is None and state.valid is None and state.size is None
                and state.policy is None and state.heads is None and state.hidden is None and state.rope is None)

    def _tokens_of(self, decided: Optional[TokenState]) -> Optional[dict]:
        """For token maps (tracing with sources): which input tokens each token stands for after a
        decision, its validity and size; None without a decision or without source tracking."""
        if decided is None or not self.track_source:
            return None
        if decided.source is None:
            raise RuntimeError(f"{type(self.method).__name__}.reduce dropped the token sources")
        copy = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return dict(source=copy(decided.source), valid=copy(decided.valid), size=copy(decided.size))

    def _layout(self, state: TokenState) -> Optional["Layout"]:
        """Where the real tokens of ``state`` are, when it runs packed (None: one (B, N, C) batch).
        Kept while the tokens' layout is (the same ``valid``, ``heads`` and ``hidden`` tensors), so
        the blocks between two decisions build it once."""
        if not state.compact or state.policy is not None or \
                (state.valid is None and state.heads is None and state.hidden is None):
            return None
        cached = self._cached_layout
        if cached is None or not cached.fits(state):
            cached = self._cached_layout = Layout(state)
        return cached

    def _attention(self, attn: Attention, qkv: Tensor, heads: int, bias: Optional[Tensor],
                   policy: Optional[Tensor], rope: Optional[Tensor] = None):
        """q, k, v (B, heads, N, d) and the attention output (B, N, heads·d) of qkv (B, N, 3·heads·d)."""
        B, N = qkv.shape[:2]
        q, k, v = qkv.reshape(B, N, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:  # each token's own rotary row (B, N, 2d), as EVA rotates q and k
            half = dict(half=True) if getattr(attn, "rotate_half", False) else {}
            q = apply_rot_embed_cat(q, rope[:, None], **half).type_as(v)
            k = apply_rot_embed_cat(k, rope[:, None], **half).type_as(v)
        dropout = attn.attn_drop.p if self.training else 0.0
        if policy is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            o = policy_attention(q, k, v, bias, policy, dropout)
        return q, k, v, o.transpose(1, 2).reshape(B, N, heads * attn.head_dim)

    @staticmethod
    def _attention_output(attn: Attention, h: Tensor, o: Tensor) -> Tensor:
        o = attn.norm(o)
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(elastic.output_projection(attn, o))

    def _attention_view(self, attended: list, state: TokenState, bias: Optional[Tensor]) -> AttentionView:
        """The block's attention as the method sees it: (B, H, N, d) for the whole batch."""
        g, q, k, v = attended[0]
        if len(attended) == 1 and (g is None or g.natural and g.span == state.x.shape[1]):
            view = AttentionView(q, k, v, bias, self.n_prefix)  # one head count: all of q's heads
        else:
            view = GroupedAttention(attended, state, bias, self.n_prefix)
        view.has_cls = self.model.cls_token is not None  # else scores use a substitute (see cls_attn)
        if not view.has_cls and getattr(self.model, "attn_pool", None) is not None:
            view.pool_attention = lambda: self._pool_attention(state, bias)
        if self._trace is not None:
            view.note_macs = self.note_macs
        return view

    @property
    def _pooled_from(self) -> int:
        return pooled_from(self.model, self.n_prefix)

    def _pool_attention(self, state: TokenState, bias: Optional[Tensor]) -> Tensor:
        """(B, N) the attention a MAP head's pooled query gives the current tokens, as if they were
        the final ones (prefix tokens the head does not pool get none): the CLS substitute."""
        m = self.model
        p = self._pooled_from
        a = attention_pool(m.attn_pool, m.norm(state.x[:, p:]), None if bias is None else bias[..., p:],
                           weights_only=True)
        if self._trace is not None:
            self.note_macs(attention_pool_macs(m.attn_pool, state.counts() - p, scoring=True),
                           attention_pool_macs(m.attn_pool, state.x.shape[1] - p, scoring=True))
        return F.pad(a, (p, 0))

    def head(self, state: TokenState) -> Tensor:
        """The model's head on the final tokens: final norm, pooling, classifier."""
        return classify(self.model, state, self._pooled_from)

    # --- tracing (used by count_macs and token maps) ---------------------------------------
    @contextlib.contextmanager
    def tracing(self, track_source: bool = False) -> Iterator[List[dict]]:
        """Record, per block, the tokens attention and MLP ran on (and sources if asked)."""
        trace: List[dict] = []
        old = self._trace, self.track_source
        self._trace, self.track_source = trace, track_source or self.track_source
        try:
            yield trace
        finally:
            self._trace, self.track_source = old

    def note_macs(self, macs: Union[float, Tensor], padded: Union[float, Tensor, None] = None) -> None:
        """Count a method's own cost (e.g. PRANCE's selector, RL4EViT's actor): ``macs`` per image,
        a number or a tensor with one entry per image; ``padded`` what the batch executed for
        them if padding made it more (default: ``macs``)."""
        if self._trace is not None:
            macs = macs if isinstance(macs, Tensor) else float(macs)
            padded = macs if padded is None else padded if isinstance(padded, Tensor) else float(padded)
            self._trace.append(dict(layer=None, macs=macs, padded_macs=padded))

    def _note_decision(self, index: int, state: TokenState) -> None:
        """When tracing, count the method's decision network at ``index`` on ``state``."""
        if self._trace is None:
            return
        macs = self.method.decision_macs(index, state)
        if macs is not None:
            padded = macs if state.valid is None else self.method.decision_macs(index, state.replace(valid=None))
            self.note_macs(macs, padded)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


# --- the entry point --------------------------------------------------------------------------
def _floating_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's floating-point weights (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def adapt(model, method="none", **options) -> LeanViT:
    """Wrap a timm VisionTransformer so that it runs with token-reduction ``method``.

    ``method`` is a registered name (see :func:`list_methods`) or a :class:`Reduction` instance.
    The original model is shared, not modified, and stays usable on its own.
    """
    if isinstance(model, LeanViT):
        # its dense model is the one composition that means something: methods do not stack (a
        # second would replace the first, which would be dropped without a word)
        chosen = method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
        if chosen != "none" and model.method.name != "none":
            raise OptionError(f"adapt: the model is already adapted with {model.method.name} ({model.method!r}); "
                              f"methods do not compose: adapt its .model (the timm model) with {chosen} instead")
        model = model.model
    return LeanViT(model, method_from(method, options))


def method_from(method, options: dict) -> Reduction:
    """The method ``adapt`` was given: a registered name built with ``options``, or a
    :class:`Reduction` instance as it is (its options went to its constructor)."""
    if isinstance(method, Reduction):
        if options:
            raise OptionError("pass options to the method's constructor, not to adapt()")
        return method
    if isinstance(method, str):
        return build_method(method, **options)
    raise OptionError(f"method must be a name or a Reduction, got {type(method).__name__}")
