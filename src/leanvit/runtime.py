"""One block runner for any timm VisionTransformer, with decision points between attention and MLP.

Every block runs as timm's pre-norm ``Block`` does, with attention through
``F.scaled_dot_product_attention`` and an additive mask carrying the log-size of merged tokens
and the padding of ragged batches. At a method's decision layers the method sees the block's
attention and returns the reduced tokens, which the block's MLP and all later blocks run on.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from . import elastic
from .methods.base import AttentionView, ModelInfo, Reduction
from .tokens import TokenState

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax")


def _mlp_hidden(mlp: nn.Module) -> int:
    fc1 = getattr(mlp, "fc1", None)
    return fc1.out_features if isinstance(fc1, nn.Linear) else 0


class UnsupportedModelError(ValueError):
    """The model has a part leanvit's runtime does not run; the message names it."""


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the part, anything the block runner would otherwise silently bypass."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"leanvit adapts timm VisionTransformer models (ViT, DeiT, DeiT-III, ...); got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} (attention pooling) is not supported; "
            f"leanvit pools with one of {SUPPORTED_POOLS}")
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward:
            raise UnsupportedModelError(
                f"block {i} is {type(blk).__name__}; leanvit runs timm's pre-norm Block only")
        if type(blk.attn).forward is not Attention.forward:
            raise UnsupportedModelError(
                f"block {i} attention is {type(blk.attn).__name__}; leanvit runs timm's Attention only")
        for name, m in blk.mlp.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise UnsupportedModelError(
                    f"block {i} mlp.{name} is a convolution; leanvit needs a token-wise MLP")


def policy_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], policy: Tensor,
                     dropout: float = 0.0, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax: the attention to each key is multiplied by its keep decision
    (every token still attends to itself), so gradients flow into differentiable decisions."""
    n = q.shape[-2]
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    keep = policy[:, None, None, :].to(q.dtype)
    keep = keep + (1.0 - keep) * eye
    w = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keep
    w = (w + eps / n) / (w.sum(dim=-1, keepdim=True) + eps)
    return F.dropout(w, dropout, training=dropout > 0) @ v


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
            mlp_hidden=_mlp_hidden(model.blocks[0].mlp) if len(model.blocks) else 0))
        for i, blk in enumerate(model.blocks):
            widths = method.block_widths(i)
            if widths:
                elastic.check_sliceable(blk, i, *widths)
        if method.position not in ("attention", "block"):
            raise ValueError(f"{method!r}: position must be 'attention' or 'block', got {method.position!r}")
        layers = frozenset(method.decision_layers())
        self.decision_layers = layers if method.position == "attention" else frozenset()
        self.after_block_layers = layers if method.position == "block" else frozenset()
        self.track_source = False  # set True to record which input tokens each token stands for
        # True: pruning marks tokens invalid instead of removing them (training with a fixed batch
        # shape, as RL4EViT and DynamicViT train); merging methods cannot run masked
        self.masked = False
        self._trace: Optional[List[dict]] = None
        self.last_state: Optional[TokenState] = None  # final tokens of the last forward when tracing
        self.train(model.training)  # a wrapper of an eval-mode model starts in eval mode

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.model, "pretrained_cfg", {})

    # --- forward ---------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.method.run(self, self.embed(images))

    def finish(self, state: TokenState) -> Tensor:
        """The head's logits for the final tokens (kept as ``last_state`` when tracing)."""
        if self._trace is not None:
            self.last_state = state
        return self.head(state)

    def embed(self, images: Tensor) -> TokenState:
        self._check_images(images)
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        source = None
        if self.track_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        self.method.begin(x.shape[0])
        return TokenState(x=x, n_prefix=self.n_prefix, source=source, compact=not self.masked)

    def run_block(self, index: int, blk: Block, state: TokenState, widths=None) -> TokenState:
        """timm's Block.forward, with the method's decision between attention and MLP (or after
        the block, for methods whose decision layers sit between blocks). ``widths`` (heads, MLP
        neurons) overrides the method's ``block_widths`` (per-group widths of PRANCE)."""
        attn = blk.attn
        x = state.x
        B, N, C = x.shape
        h = blk.norm1(x)
        gate = attn.gate(h).sigmoid() if attn.gate is not None else None
        heads, hidden = widths or self.method.block_widths(index) or (None, None)  # channel-elastic methods
        qkv, heads = elastic.attention_projections(attn, h, heads)
        q, k, v = qkv.reshape(B, N, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = state.attn_bias()
        dropout = attn.attn_drop.p if self.training else 0.0
        if state.policy is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            o = policy_attention(q, k, v, bias, state.policy, dropout)
        o = attn.norm(o.transpose(1, 2).reshape(B, N, heads * attn.head_dim))
        if gate is not None:
            o = o * gate
        o = attn.proj_drop(elastic.output_projection(attn, o))
        state = state.replace(x=x + blk.drop_path1(blk.ls1(o)))
        counts_in = state.counts() if self._trace is not None else None

        if index in self.decision_layers:
            self._note_decision(index, state)
            state = self.method.reduce(index, state, AttentionView(q, k, v, bias, self.n_prefix))
        del q, k, v, o  # free the attention buffers before the MLP allocates its own

        x = state.x
        x = x + blk.drop_path2(blk.ls2(elastic.mlp_forward(blk.mlp, blk.norm2(x), hidden)))
        if self._trace is not None:
            self._trace.append(dict(layer=index, attn_tokens=counts_in, attn_width=N, heads=heads,
                                    mlp_tokens=state.counts(), mlp_width=x.shape[1], hidden=hidden,
                                    rows=state.rows))
        state = state.replace(x=x)
        if index in self.after_block_layers:
            self._note_decision(index, state)
            state = self.method.reduce(index, state, None)
        return state

    def head(self, state: TokenState) -> Tensor:
        m = self.model
        x = m.norm(state.x)
        if m.global_pool == "token":  # CLS (and distillation) token: timm's own head
            return m.forward_head(x)
        p = 0 if m.pool_include_prefix else self.n_prefix
        x = x[:, p:]
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

    def note_macs(self, rows: Optional[Tensor], macs: Union[float, Tensor],
                  padded: Union[float, Tensor, None] = None) -> None:
        """Count a method's own cost (e.g. PRANCE's selector, RL4EViT's actor) for images ``rows``
        (None: all): ``macs`` per image, a number or a tensor with one entry per image; ``padded``
        what the batch executed for them if padding made it more (default: ``macs``)."""
        if self._trace is not None:
            macs = macs if isinstance(macs, Tensor) else float(macs)
            padded = macs if padded is None else padded if isinstance(padded, Tensor) else float(padded)
            self._trace.append(dict(layer=None, macs=macs, padded_macs=padded, rows=rows))

    def _note_decision(self, index: int, state: TokenState) -> None:
        """When tracing, count the method's decision network at ``index`` on ``state``."""
        if self._trace is None:
            return
        macs = self.method.decision_macs(index, state)
        if macs is not None:
            padded = macs if state.valid is None else self.method.decision_macs(index, state.replace(valid=None))
            self.note_macs(state.rows, macs, padded)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"
