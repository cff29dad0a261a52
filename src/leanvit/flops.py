"""Multiply-accumulates of what actually ran, counted analytically from the executed token counts.

Counted as the token-reduction papers do ("GFLOPs" there are GMACs): the patch embedding, every
linear layer, ``2·N²·d`` per attention (QKᵀ and AV) and the head. A method's learned decision
network (RL4EViT's actor, DynamicViT's predictors, PRANCE's selector) is counted too, by its
linear layers on the tokens it ran on (:meth:`Reduction.decision_macs`). Norms, activations,
softmax and parameter-free scoring (attention-based, similarity) are not counted (see
``leanvit bench`` for the decision overhead).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from .runtime import LeanViT


def linear_macs(module: nn.Module) -> int:
    """MACs per token of all linear layers in ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def embed_macs(model: nn.Module, images: Tensor) -> int:
    """MACs of the patch embedding (any stem) for one image, measured on the executed graph."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.patch_embed(images[:1])
    return counter.get_total_flops() // 2


def macs_per_image(runner: LeanViT, trace: List[dict], images: Tensor, padded: bool = False) -> Tensor:
    """(B,) MACs of each image from a trace of :meth:`LeanViT.tracing`.

    ``padded=False`` counts each image's own tokens (what the image needs); ``padded=True``
    counts what the ragged batch executed, padding included.
    """
    m = runner.model
    total = torch.full((images.shape[0],), float(embed_macs(m, images)), dtype=torch.float64)
    for rec in trace:
        rows = rec.get("rows")  # a group of the batch (methods whose images take different paths)
        if "macs" in rec:  # a method's own counted cost (PRANCE's selector, RL4EViT's actor, ...)
            macs = rec["padded_macs" if padded else "macs"]
            if isinstance(macs, Tensor):  # one entry per image of the record
                macs = macs.detach().double().cpu()
        else:
            n_attn = float(rec["attn_width"]) if padded else rec["attn_tokens"].double().cpu()
            n_mlp = float(rec["mlp_width"]) if padded else rec["mlp_tokens"].double().cpu()
            macs = block_macs(m.blocks[rec["layer"]], n_attn, n_mlp, rec["heads"], rec["hidden"])
        if rows is None:
            total += macs
        else:
            total[rows.cpu()] += macs
    return total + head_macs(m)


def tokens_per_block(trace: List[dict], batch: int, key: str = "mlp_tokens") -> Tensor:
    """(blocks, B) tokens per image that each block's MLP (``key="mlp_tokens"``) or attention
    (``"attn_tokens"``) ran on, from a trace of :meth:`LeanViT.tracing`: the records of groups of
    the batch (their ``rows``) are put back in the batch's order; counted costs are skipped."""
    blocks = [rec for rec in trace if rec["layer"] is not None]
    layers = sorted({rec["layer"] for rec in blocks})
    out = torch.zeros(len(layers), batch, dtype=torch.long)
    for rec in blocks:
        rows = rec.get("rows")
        out[layers.index(rec["layer"]), slice(None) if rows is None else rows.cpu()] = rec[key].cpu()
    return out


def block_macs(blk: nn.Module, n_attn, n_mlp, heads=None, hidden=None):
    """MACs of one block whose attention runs on ``n_attn`` tokens and MLP on ``n_mlp`` tokens
    (numbers or tensors), with its first ``heads`` heads and ``hidden`` MLP neurons (None: all)."""
    attn = blk.attn
    heads = attn.num_heads if heads is None else heads
    width = heads * attn.head_dim  # first-k sliced heads (channel-elastic methods)
    attn_lin = linear_macs(attn) if heads == attn.num_heads else width * (3 * attn.qkv.in_features + attn.proj.out_features)
    mlp_lin = linear_macs(blk.mlp) if hidden is None else hidden * (blk.mlp.fc1.in_features + blk.mlp.fc2.out_features)
    return n_attn * attn_lin + 2 * n_attn * n_attn * width + n_mlp * mlp_lin


def head_macs(model: nn.Module) -> int:
    return linear_macs(model.head) + (linear_macs(model.head_dist) if hasattr(model, "head_dist") else 0) \
        + linear_macs(model.fc_norm)


def as_runner(module: nn.Module) -> LeanViT:
    if isinstance(module, LeanViT):
        return module
    from . import adapt
    return adapt(module, "none")


def count_macs(module: nn.Module, images: Tensor, padded: bool = False) -> float:
    """GMACs per image (the mean over the batch when images differ) of ``module`` on ``images``.

    ``module`` is a model from :func:`leanvit.adapt` or a plain timm VisionTransformer (counted
    dense). Runs one forward in eval mode without gradients.
    """
    runner = as_runner(module)
    was_training = runner.training
    runner.eval()
    try:
        with torch.no_grad(), runner.tracing() as trace:
            runner(images)
    finally:
        runner.train(was_training)
    return float(macs_per_image(runner, trace, images, padded).mean()) / 1e9
