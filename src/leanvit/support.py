"""What of a timm model leanvit's block runner runs: the checks that refuse the rest, naming the
part, and the parts the runner computes itself instead of calling timm's: the heads (CLS, average/max
pooling over merged and padded tokens, the MAP attention pool), layer scales, and DynamicViT's
training attention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import Attention, AttentionPoolLatent
from timm.models.eva import Eva, EvaAttention, EvaBlock
try:
    from timm.layers import AttentionRope  # RoPE ViTs (newer timm)
except ImportError:
    AttentionRope = EvaAttention
from timm.models.vision_transformer import Block, VisionTransformer

from .tokens import TokenState


SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "map")


def mlp_hidden(mlp: nn.Module) -> int:
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


def layer_scale(blk: nn.Module, i: int, t: Tensor) -> Tensor:
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
    so the predictors ignored the keep rate. A dropped key's exponent is capped
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


def check_images(model: nn.Module, images: Tensor) -> None:
    """Refuse, with a one-line reason, images the model cannot take (not (B, C, H, W), other
    channels, another size where the model's patch embedding is fixed to one)."""
    pe = model.patch_embed
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected a batch of images (B, C, H, W), got {shape}")
    in_chans = getattr(pe, "in_chans", None)  # HybridEmbed (conv stems) records it
    if in_chans is None and isinstance(getattr(pe, "proj", None), nn.Conv2d):
        in_chans = pe.proj.in_channels  # PatchEmbed
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(f"the model expects {in_chans}-channel images, got {images.shape[1]} channels")
    if getattr(pe, "img_size", None) is not None and getattr(pe, "strict_img_size", True) \
            and not getattr(model, "dynamic_img_size", False):
        want = tuple(pe.img_size)
        if tuple(images.shape[-2:]) != want:
            raise ValueError(
                f"the model expects {want[0]}x{want[1]} images, got {images.shape[-2]}x{images.shape[-1]}; "
                f"preprocess with leanvit.data.eval_transform(model) (it reads the model's pretrained config)")


def pooled_from(model: nn.Module, n_prefix: int) -> int:
    """The first token the head pools: prefix tokens only if the model pools them (timm's
    ``pool_include_prefix``; EVA's attention pool pools every token)."""
    if isinstance(model, Eva):
        return 0 if model.attn_pool is not None else n_prefix
    return 0 if model.pool_include_prefix else n_prefix


def classify(model: nn.Module, state: TokenState, first: int) -> Tensor:
    """The model's head on the final tokens of ``state``: its final norm, its pooling of tokens
    ``first``.. (merged tokens weigh by their size, padding by nothing) and its classifier."""
    m, p = model, first
    x = m.norm(state.x)
    if m.global_pool == "token":  # CLS (and distillation) token: timm's own head
        return m.forward_head(x)
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
