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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import Attention, AttentionPoolLatent
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
try:
    from timm.layers import AttentionRope  # RoPE ViTs (newer timm)
except ImportError:
    AttentionRope = EvaAttention
from timm.models.vision_transformer import Block, VisionTransformer

from . import elastic
from .device import module_device
from .flops import attention_pool_macs
from .methods import OptionError, build_method  # the package: every method registered
from .methods.base import AttentionView, ModelInfo, Reduction, lazy
from .tokens import TokenState, identity_rope

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "map")


def _mlp_hidden(mlp: nn.Module) -> int:
    fc1 = getattr(mlp, "fc1", None)
    return fc1.out_features if isinstance(fc1, nn.Linear) else 0


class UnsupportedModelError(ValueError):
    """The model has a part leanvit's runtime does not run; the message names it."""


# timm ViT families of their own class, and the part the block runner would need to run them
UNSUPPORTED_FAMILIES = {
    "Beit": "(BEiT) relative position biases inside attention",
    "VisionTransformerSAM": "(SAM) windowed attention with relative positions and a convolutional neck",
}


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the part, anything the block runner would otherwise silently bypass."""
    if isinstance(model, Eva):
        _check_eva(model)
    elif not isinstance(model, VisionTransformer):
        name = type(model).__name__
        part = f": {UNSUPPORTED_FAMILIES[name]} are not run by leanvit's block runner" if name in UNSUPPORTED_FAMILIES else ""
        raise UnsupportedModelError(
            f"leanvit adapts timm VisionTransformer and Eva models (ViT, DeiT, DINOv2, CLIP, SigLIP, EVA-02, "
            f"...); got {name}{part}")
    pool = getattr(model, "attn_pool", None)
    if model.global_pool not in SUPPORTED_POOLS or (pool is not None and type(pool) is not AttentionPoolLatent):
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} ({type(pool).__name__ if pool is not None else 'pooling'}) "
            f"is not supported; leanvit pools with one of {SUPPORTED_POOLS} (map: timm's AttentionPoolLatent)")
    if pool is not None and pool.pos_embed is not None:
        raise UnsupportedModelError(
            "the attention pool's own position embedding (pos_embed='abs') is not supported: it is "
            "laid over a fixed token grid, which reduced tokens no longer form")
    eva = isinstance(model, Eva)
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not (EvaBlock if eva else Block).forward:
            raise UnsupportedModelError(f"block {i} is {type(blk).__name__}; leanvit runs timm's pre-norm "
                                        f"{'EvaBlock' if eva else 'Block'} only")
        kinds = (EvaAttention, AttentionRope) if eva else (Attention,)
        if not any(type(blk.attn).forward is k.forward for k in kinds):
            raise UnsupportedModelError(f"block {i} attention is {type(blk.attn).__name__}; leanvit runs "
                                        f"{' and '.join(k.__name__ for k in kinds)} only")
        if getattr(blk.attn, "num_kv_groups", 1) != 1:
            raise UnsupportedModelError(f"block {i} attention has grouped-query heads (num_kv_heads), not supported")
        for name, m in blk.mlp.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise UnsupportedModelError(
                    f"block {i} mlp.{name} is a convolution; leanvit needs a token-wise MLP")


def _check_eva(model: Eva) -> None:
    """EVA-02 and RoPE ViTs (timm's ``Eva``): what of them the block runner does not run."""
    if getattr(model, "rope_mixed", False):
        raise UnsupportedModelError("Eva with mixed rotary embeddings (rope_type='mixed': per-block, "
                                    "per-head learned frequencies) is not supported; leanvit runs one rotary table")
    if model.patch_drop is not None:
        raise UnsupportedModelError("Eva's patch dropout (patch_drop_rate > 0) is not supported")


def _layer_scale(blk: nn.Module, i: int, t: Tensor) -> Tensor:
    """Block's layer scale ``i`` (1: attention, 2: MLP): timm's ``ls1``/``ls2``, or EVA's ``gamma_1``/``gamma_2``."""
    ls = getattr(blk, f"ls{i}", None)
    if ls is not None:
        return ls(t)
    gamma = getattr(blk, f"gamma_{i}")
    return t if gamma is None else gamma * t


def attention_pool(pool: AttentionPoolLatent, x: Tensor, bias: Optional[Tensor],
                   weights_only: bool = False) -> Tensor:
    """timm's ``AttentionPoolLatent.forward`` on tokens ``x`` (B, N, C) with the blocks' additive
    mask ``bias`` (B, 1, 1, N) (log-size of merged tokens, padding); or, ``weights_only``, the
    (B, N) attention of its latent queries (mean over heads and latents)."""
    B, N, C = x.shape
    H, d, L = pool.num_heads, pool.head_dim, pool.latent_len
    # repeat, not expand: a view of a parameter made under no_grad trips module hooks (FlopCounterMode)
    q = pool.q_norm(pool.q(pool.latent.repeat(B, 1, 1)).reshape(B, L, H, d).transpose(1, 2))
    if weights_only:  # the key half of the projection only
        kb = None if pool.kv.bias is None else pool.kv.bias[:H * d]
        k = pool.k_norm(F.linear(x, pool.kv.weight[:H * d], kb).reshape(B, N, H, d).transpose(1, 2))
        logits = (q * pool.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1).mean(dim=(1, 2))
    k, v = pool.kv(x).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, pool.k_norm(k), v, attn_mask=bias)
    o = pool.proj_drop(pool.proj(o.transpose(1, 2).reshape(B, L, C)))
    if pool.mlp is not None:
        o = o + pool.mlp(pool.norm(o))
    return o[:, 0] if pool.pool == "token" else o.mean(dim=1) if pool.pool == "avg" else o


def policy_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], policy: Tensor,
                     dropout: float = 0.0) -> Tensor:
    """DynamicViT's masked softmax: the attention to each key is multiplied by its (hard, 0/1
    forward) keep decision, every token still attending to itself, so gradients flow into the
    differentiable decisions.

    The softmax is shifted by the largest logit among each query's *kept* keys, so its forward is
    exactly attention over the kept tokens (what inference runs after real removal). The authors'
    code shifts by the largest over all keys and adds eps = 1e-6: when a query's largest key is
    dropped and its attention is peaked (logit gaps > 14, common on our reference model), the kept
    keys' weights underflow below eps, that query attends uniformly, and the gradient into the
    decisions grows to ~1/eps; on the reference model it was 1e4-1e5 times the keep-ratio loss's,
    so the predictors ignored the keep rate (issue 13, item 6). A dropped key's exponent is capped
    at the kept maximum's: its weight is 0 in the forward either way, and the gradient toward
    keeping it stays bounded (as if it were at most as attended as the best kept key)."""
    n = q.shape[-2]
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    keep = policy[:, None, None, :].to(q.dtype)
    keep = keep + (1.0 - keep) * eye
    top = logits.detach().masked_fill(keep.detach() <= 0, float("-inf")).amax(dim=-1, keepdim=True)
    w = (logits - top).clamp(max=0).exp() * keep  # the largest kept key contributes 1: no underflow
    w = w / w.sum(dim=-1, keepdim=True)
    return F.dropout(w, dropout, training=dropout > 0) @ v


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
            mlp_hidden=_mlp_hidden(model.blocks[0].mlp) if len(model.blocks) else 0,
            channel_elastic=all(elastic.sliceable(blk) for blk in model.blocks)))
        if isinstance(method, nn.Module):  # a learned method's networks (built by bind) live where the model does
            method.to(module_device(model))
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
        self._cached_layout: Optional[_Layout] = None
        self.last_state: Optional[TokenState] = None  # final tokens of the last forward when tracing
        self.train(model.training)  # a wrapper of an eval-mode model starts in eval mode

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.model, "pretrained_cfg", {})

    # --- forward ---------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] == 0:
            self._check_images(images)
            return self.model(images)  # nothing to decide: timm's own (empty) output
        return self.run(self.embed(images))

    def forward_tokens(self, images: Tensor, source: bool = False) -> "TokenOutput":
        """The encoder's final tokens, reduced by the method and normed as timm's
        ``forward_features`` returns them (with ``none``: exactly those). ``source=True`` also
        returns the patch-to-token map, which :meth:`unmerge` needs."""
        if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] == 0:
            self._check_images(images)
            x = self.model.forward_features(images)
            eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(0, -1, -1) if source else None
            return TokenOutput(x, x.new_ones(x.shape[:2]), None, eye)
        old = self.track_source
        self.track_source = source or old
        try:
            state = self.run_blocks(self.embed(images))
        finally:
            self.track_source = old
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
        self._check_images(images)
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
                  packed: Optional["_Packed"] = None) -> Tuple[TokenState, Optional["_Packed"]]:
        """timm's Block.forward, with the method's decision between attention and MLP (or after
        the block, for methods whose decision layers sit between blocks).

        A batch whose images differ (per-image token counts, or per-image widths ``state.heads`` /
        ``state.hidden``) runs packed (:class:`_Layout`): the token-wise work (norms, qkv, proj,
        MLP) runs on the real tokens of the whole batch as one (T, C) matrix, sorted so that the
        images of one width are one contiguous block of rows: one call per distinct width, on a
        view. Attention runs once per head count, over that group's images padded to its widest
        one (SDPA with the padding in its additive mask; a block-diagonal mask over all packed
        tokens would cost T² instead of the sum of the images' N², and per-image calls cost a call
        each). The packed tokens stay packed from block to block until a method reads them: then
        the block returns ``(state, packed)`` with ``state.x`` stale and ``packed`` to unpack.
        Otherwise the batch runs as one (B, N, C) tensor, as timm runs it, and ``packed`` is None.
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
        decided = None  # the state a decision in this block returned
        attn_run, attn_span = (layout.counts, layout.spans()) if layout and trace else (float(state.x.shape[1]),) * 2

        h = blk.norm1(x)
        bias = layout.attn_bias(state) if layout else state.attn_bias()
        attended, outs = [], []  # (group, q, k, v) and the output rows per head count
        rope = state.rope if state.rope is None or not layout else layout.pack(state.rope)
        for g in layout.attention_groups(static[0]) if layout else [None]:
            width = static[0] if g is None else g.width
            hg = h if g is None else g.take(h)
            qkv, width = elastic.attention_projections(blk.attn, hg, width)
            q, k, v, o = self._attention(blk.attn, qkv if g is None else g.pad(qkv), width,
                                         bias if g is None else g.bias(bias, state.size), state.policy,
                                         rope if g is None or rope is None else g.pad(g.take(rope)))
            outs.append(self._attention_output(blk.attn, hg, o if g is None else g.unpad(o)))
            attended.append((g, q, k, v))
        x = x + blk.drop_path1(_layer_scale(blk, 1, outs[0] if len(outs) == 1 else torch.cat(outs)))

        if decide and index in self.decision_layers:
            state = layout.unpack(state, x) if layout else state.replace(x=x)
            self._note_decision(index, state)
            state = self.method.reduce(index, state, self._attention_view(attended, state, bias))
            decided = state
            layout = self._layout(state)
            x = layout.pack(state.x, mlp_order=True) if layout else state.x
        elif layout:
            x = layout.to_mlp_order(x)
        del attended, outs, q, k, v, o  # free the attention buffers before the MLP allocates its own

        h = blk.norm2(x)
        outs = [elastic.mlp_forward(blk.mlp, h if g is None else g.take(h), static[1] if g is None else g.width)
                for g in (layout.mlp_groups(static[1]) if layout else [None])]
        x = x + blk.drop_path2(_layer_scale(blk, 2, outs[0] if len(outs) == 1 else torch.cat(outs)))
        packed = _Packed(layout, layout.to_attention_order(x)) if layout else None
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

    def _layout(self, state: TokenState) -> Optional["_Layout"]:
        """Where the real tokens of ``state`` are, when it runs packed (None: one (B, N, C) batch).
        Kept while the tokens' layout is (the same ``valid``, ``heads`` and ``hidden`` tensors), so
        the blocks between two decisions build it once."""
        if not state.compact or state.policy is not None or \
                (state.valid is None and state.heads is None and state.hidden is None):
            return None
        cached = self._cached_layout
        if cached is None or not cached.fits(state):
            cached = self._cached_layout = _Layout(state)
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
            view = _GroupedAttention(attended, state, bias, self.n_prefix)
        view.has_cls = self.model.cls_token is not None  # else scores use a substitute (see cls_attn)
        if not view.has_cls and getattr(self.model, "attn_pool", None) is not None:
            view.pool_attention = lambda: self._pool_attention(state, bias)
        if self._trace is not None:
            view.note_macs = self.note_macs
        return view

    @property
    def _pooled_from(self) -> int:
        """The first token the head pools: prefix tokens only if the model pools them (timm's
        ``pool_include_prefix``; EVA's attention pool pools every token)."""
        m = self.model
        if isinstance(m, Eva):
            return 0 if m.attn_pool is not None else self.n_prefix
        return 0 if m.pool_include_prefix else self.n_prefix

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
        m = self.model
        x = m.norm(state.x)
        if m.global_pool == "token":  # CLS (and distillation) token: timm's own head
            return m.forward_head(x)
        p = self._pooled_from
        x = x[:, p:]
        if m.attn_pool is not None:  # MAP: the latent query attends as the blocks do (log-size, padding)
            bias = state.attn_bias()
            pooled = attention_pool(m.attn_pool, x, None if bias is None else bias[..., p:])
            return m.head(m.head_drop(m.fc_norm(pooled)))
        valid = None if state.valid is None else state.valid[:, p:]
        if m.global_pool in ("avg", "avgmax"):
            # mean over the input patches: merged tokens weigh by their size, padding by zero
            w = state.sizes()[:, p:]
            if valid is not None:
                w = w * valid
            avg = (x * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        if m.global_pool in ("max", "avgmax"):
            mx = x if valid is None else x.masked_fill(~valid[..., None], float("-inf"))
            mx = mx.amax(dim=1)
        pooled = {"avg": lambda: avg, "max": lambda: mx, "avgmax": lambda: 0.5 * (avg + mx)}[m.global_pool]()
        return m.head(m.head_drop(m.fc_norm(pooled)))

    def _check_images(self, images: Tensor) -> None:
        pe = self.model.patch_embed
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected a batch of images (B, C, H, W), got {shape}")
        in_chans = getattr(pe, "in_chans", None)  # HybridEmbed (conv stems) records it
        if in_chans is None and isinstance(getattr(pe, "proj", None), nn.Conv2d):
            in_chans = pe.proj.in_channels  # PatchEmbed
        if in_chans is not None and images.shape[1] != in_chans:
            raise ValueError(f"the model expects {in_chans}-channel images, got {images.shape[1]} channels")
        if getattr(pe, "img_size", None) is not None and getattr(pe, "strict_img_size", True) \
                and not getattr(self.model, "dynamic_img_size", False):
            want = tuple(pe.img_size)
            if tuple(images.shape[-2:]) != want:
                raise ValueError(
                    f"the model expects {want[0]}x{want[1]} images, got {images.shape[-2]}x{images.shape[-1]}; "
                    f"preprocess with leanvit.data.eval_transform(model) (it reads the model's pretrained config)")

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


# --- packed execution -----------------------------------------------------------------------
class _GroupedAttention(AttentionView):
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


class _Packed(NamedTuple):
    """A batch's real tokens packed by ``layout`` (attention order), between two blocks."""

    layout: "_Layout"
    x: Tensor

    def unpack(self, state: TokenState) -> TokenState:
        return self.layout.unpack(state, self.x)


class _Layout:
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

    def __init__(self, layout: _Layout, images: Optional[np.ndarray], counts: np.ndarray):
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


# --- the entry point --------------------------------------------------------------------------
def adapt(model, method="none", **options) -> LeanViT:
    """Wrap a timm VisionTransformer so that it runs with token-reduction ``method``.

    ``method`` is a registered name (see :func:`list_methods`) or a :class:`Reduction` instance.
    The original model is shared, not modified, and stays usable on its own.
    """
    if isinstance(model, LeanViT):
        model = model.model
    if isinstance(method, Reduction):
        if options:
            raise OptionError("pass options to the method's constructor, not to adapt()")
    elif isinstance(method, str):
        method = build_method(method, **options)
    else:
        raise OptionError(f"method must be a name or a Reduction, got {type(method).__name__}")
    return LeanViT(model, method)
