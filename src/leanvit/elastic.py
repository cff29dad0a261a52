"""Channel elasticity: run any block with its first ``h`` attention heads and first ``m`` MLP
neurons (first-k weight slicing, physically smaller matmuls), and reorder a model's heads and
neurons by importance so that the first k are the best k (PRANCE's meta-network).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from timm.layers import Attention, Mlp


def check_sliceable(blk: nn.Module, index: int, heads: Optional[int], hidden: Optional[int]) -> None:
    """Refuse, naming the part, widths the block cannot be sliced to."""
    attn = blk.attn
    if heads is not None:
        if not isinstance(attn, Attention):
            raise ValueError(f"block {index}: only timm's Attention can be sliced by heads, got {type(attn).__name__}")
        if not 1 <= heads <= attn.num_heads:
            raise ValueError(f"block {index}: heads must be in 1..{attn.num_heads}, got {heads}")
        if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
            raise ValueError(f"block {index}: attention with scale_norm or a gate cannot be sliced by heads")
    if hidden is not None:
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
            raise ValueError(f"block {index}: only timm's plain Mlp can be sliced, got {type(blk.mlp).__name__}")
        if not 1 <= hidden <= blk.mlp.fc1.out_features:
            raise ValueError(f"block {index}: MLP width must be in 1..{blk.mlp.fc1.out_features}, got {hidden}")


def sliceable(blk: nn.Module) -> bool:
    """Whether the block's heads and MLP neurons can be sliced at all (timm's Attention and Mlp)."""
    return isinstance(blk.attn, Attention) and type(blk.mlp) is Mlp


def qkv_rows(attn: nn.Module, heads: int) -> Tensor:
    """Indices of the qkv output rows of the first ``heads`` heads (for q, k and v)."""
    d, full = attn.head_dim, attn.num_heads * attn.head_dim
    first = torch.arange(heads * d, device=attn.qkv.weight.device)
    return torch.cat([first, first + full, first + 2 * full])


def _sliced(linear: nn.Linear, kind: str, width: int, make) -> Tuple[Tensor, Optional[Tensor]]:
    """``make(linear) -> (weight, bias)`` sliced for ``width``, as contiguous tensors: a matmul with a
    strided or gathered weight costs 3-4x on CPU. Kept on the layer while its weights are unchanged
    (their version counters) and no gradient must flow into them (inference)."""
    if torch.is_grad_enabled() and linear.weight.requires_grad or torch.compiler.is_compiling():
        return make(linear)  # compiled or exported: the slice is part of the graph (no host-side cache)
    key = (kind, width)
    stamp = (linear.weight._version, linear.weight.data_ptr(), linear.weight.dtype, linear.weight.device,
             None if linear.bias is None else linear.bias._version)
    cache = linear.__dict__.setdefault("_leanvit_slices", {})
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        w, b = make(linear)
        hit = cache[key] = (stamp, w.contiguous(), None if b is None else b.contiguous())
    return hit[1], hit[2]


def attention_projections(attn: nn.Module, h: Tensor, heads: Optional[int]) -> Tuple[Tensor, int]:
    """qkv of the first ``heads`` heads: (B, N, 3 * heads * head_dim), and the head count."""
    if heads is None or heads == attn.num_heads:
        return _qkv(attn, h), attn.num_heads
    if not isinstance(attn, Attention):
        raise ValueError(f"only timm's Attention can be sliced by heads, got {type(attn).__name__}")

    def make(qkv):  # the rows of qkv_rows as three slices: a slice exports (and constant-folds) better than a gather
        n = heads * attn.head_dim
        w = qkv.weight.view(3, -1, qkv.in_features)[:, :n].reshape(3 * n, qkv.in_features)
        return w, None if qkv.bias is None else qkv.bias.view(3, -1)[:, :n].reshape(3 * n)
    return F.linear(h, *_sliced(attn.qkv, "qkv", heads, make)), heads


def _qkv(attn: nn.Module, h: Tensor) -> Tensor:
    """The full qkv, as timm's Attention and EVA's attentions (EvaAttention: separate q and v
    biases; AttentionRope: fused, or separate projections) compute it."""
    if attn.qkv is None:
        return torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(h)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(h) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(h, attn.qkv.weight, bias)


def output_projection(attn: nn.Module, o: Tensor) -> Tensor:
    width = o.shape[-1]
    if width == attn.proj.in_features:
        return attn.proj(o)
    return F.linear(o, *_sliced(attn.proj, "in", width, lambda m: (m.weight[:, :width], m.bias)))


def mlp_forward(mlp: nn.Module, x: Tensor, hidden: Optional[int]) -> Tensor:
    """timm's Mlp with its first ``hidden`` neurons (the whole MLP when None)."""
    if hidden is None or hidden == getattr(getattr(mlp, "fc1", None), "out_features", None):
        return mlp(x)
    if type(mlp) is not Mlp:
        raise ValueError(f"only timm's plain Mlp can be sliced, got {type(mlp).__name__}")
    fc1 = _sliced(mlp.fc1, "out", hidden, lambda m: (m.weight[:hidden], None if m.bias is None else m.bias[:hidden]))
    x = mlp.drop1(mlp.act(F.linear(x, *fc1)))
    return mlp.drop2(F.linear(x, *_sliced(mlp.fc2, "in", hidden, lambda m: (m.weight[:, :hidden], m.bias))))


@torch.no_grad()
def reorder_by_importance(model: nn.Module) -> nn.Module:
    """Permute every block's heads and MLP neurons, most important first, without changing what
    the model computes. Importance is data-free: a head's ‖W_v‖·‖W_proj‖ over its channels, a
    neuron's ‖fc1 row‖·‖fc2 column‖ (the size of the path through it)."""
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        check_sliceable(blk, i, attn.num_heads, None)
        H, d = attn.num_heads, attn.head_dim
        w = attn.qkv.weight.view(3, H, d, -1)
        v_norm = w[2].flatten(1).norm(dim=1)
        proj_norm = attn.proj.weight.view(attn.proj.out_features, H, d).transpose(0, 1).flatten(1).norm(dim=1)
        order = (v_norm * proj_norm).argsort(descending=True)
        attn.qkv.weight.copy_(w[:, order].reshape_as(attn.qkv.weight))
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(attn.qkv.bias.view(3, H, d)[:, order].reshape(-1))
        attn.proj.weight.copy_(attn.proj.weight.view(-1, H, d)[:, order].reshape_as(attn.proj.weight))

        if type(blk.mlp) is Mlp and isinstance(blk.mlp.norm, nn.Identity):
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
            order = (fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)).argsort(descending=True)
            fc1.weight.copy_(fc1.weight[order])
            if fc1.bias is not None:
                fc1.bias.copy_(fc1.bias[order])
            fc2.weight.copy_(fc2.weight[:, order])
    return model
