"""Multiply-accumulates of what actually ran, counted analytically from the executed token counts.

Counted as the token-reduction papers do ("GFLOPs" there are GMACs): the patch embedding, every
linear layer, ``2·N²·d`` per attention (QKᵀ and AV) and the head. A method's learned decision
network (RL4EViT's actor, DynamicViT's predictors, PRANCE's selector) is counted too, by its
linear layers on the tokens it ran on (:meth:`Reduction.decision_macs`). Norms, activations,
softmax and parameter-free scoring (attention-based, similarity) are not counted (see
``leanvit bench`` for the decision overhead), except, on a model without a CLS token, the
substitute for the CLS attention (a full attention map, or an attention-pool head's key
projection; :attr:`leanvit.methods.base.AttentionView.cls_attn`), which is not negligible.

Pure formulas over modules and token counts; :mod:`leanvit.measure` applies them to what a
runner ran.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode



def linear_macs(module: nn.Module) -> int:
    """MACs per token of all linear layers in ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def embed_macs(model: nn.Module, images: Tensor) -> int:
    """MACs of the patch embedding (any stem) for one image, measured on the executed graph."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.patch_embed(images[:1])
    return counter.get_total_flops() // 2


def tokens_per_block(trace: List[dict], key: str = "mlp_tokens") -> Tensor:
    """(blocks, B) tokens per image that each block's MLP (``key="mlp_tokens"``) or attention
    (``"attn_tokens"``) ran on, from a trace of :meth:`LeanViT.tracing` (counted costs skipped)."""
    return torch.stack([rec[key].cpu() for rec in trace if rec["layer"] is not None])


def block_macs(blk: nn.Module, n_attn, n_mlp, heads=None, hidden=None, span=None):
    """MACs of one block whose attention's linear layers run on ``n_attn`` tokens and its
    softmax(QKᵀ)V over a sequence of ``span`` (padding included; default ``n_attn``), and whose MLP
    runs on ``n_mlp`` tokens, with its first ``heads``
    heads and ``hidden`` MLP neurons (None: all). Numbers, or tensors with one entry per image."""
    attn = blk.attn
    span = n_attn if span is None else span
    full = heads is None or (not isinstance(heads, Tensor) and heads == attn.num_heads)
    width = (attn.num_heads if heads is None else heads) * attn.head_dim  # first-k sliced heads
    attn_lin = linear_macs(attn) if full else width * (3 * attn.qkv.in_features + attn.proj.out_features)
    mlp_lin = linear_macs(blk.mlp) if hidden is None else hidden * (blk.mlp.fc1.in_features + blk.mlp.fc2.out_features)
    return n_attn * attn_lin + 2 * span * span * width + n_mlp * mlp_lin


def head_macs(model: nn.Module) -> int:
    return linear_macs(model.head) + (linear_macs(model.head_dist) if hasattr(model, "head_dist") else 0) \
        + linear_macs(model.fc_norm)


def attention_pool_macs(pool: nn.Module, n, scoring: bool = False):
    """MACs of timm's attention-pool head (``AttentionPoolLatent``, SigLIP's MAP) over ``n`` tokens
    (a number or a tensor per image): its key/value projection per token, the projections and MLP
    of its latent queries, and their attention (2·L·n·C). ``scoring``: only what scoring with its
    pooled query runs (the key half of the projection, the query projection, QKᵀ)."""
    L, width = pool.latent_len, pool.num_heads * pool.head_dim
    if scoring:
        return n * (linear_macs(pool.kv) // 2) + L * linear_macs(pool.q) + L * n * width
    return n * linear_macs(pool.kv) + L * (linear_macs(pool) - linear_macs(pool.kv)) + 2 * L * n * width
