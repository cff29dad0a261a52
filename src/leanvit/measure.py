"""MACs of what a runner actually ran: the formulas of :mod:`leanvit.flops` applied to the token
counts and widths its trace recorded, block by block."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch import Tensor

from .flops import block_macs, embed_macs, head_macs
from .adapters import adapt
from .runtime import LeanViT


def macs_per_image(runner: LeanViT, trace: List[dict], images: Tensor, padded: bool = False) -> Tensor:
    """(B,) MACs of each image from a trace of :meth:`LeanViT.tracing`.

    ``padded=False`` counts each image's own tokens (what the image needs); ``padded=True``
    counts what the batch executed, padding included (packed batches pad only attention).
    """
    m = runner.model
    total = torch.full((images.shape[0],), float(embed_macs(m, images)), dtype=torch.float64)
    for rec in trace:
        if "macs" in rec:  # a method's own counted cost (PRANCE's selector, RL4EViT's actor, ...)
            macs = _numbers(rec["padded_macs" if padded else "macs"])
        elif padded:
            macs = block_macs(m.blocks[rec["layer"]], _numbers(rec["attn_run"]), _numbers(rec["mlp_run"]),
                              _numbers(rec["heads"]), _numbers(rec["hidden"]), _numbers(rec["attn_span"]))
        else:
            macs = block_macs(m.blocks[rec["layer"]], _numbers(rec["attn_tokens"]), _numbers(rec["mlp_tokens"]),
                              _numbers(rec["heads"]), _numbers(rec["hidden"]))
        total += macs
    return total + head_macs(m)


def image_configurations(trace: List[dict], batch: int) -> List[tuple]:
    """Per image, what every traced block ran with: (heads, MLP width, tokens) per block (images
    with the same configuration can share every matmul of a packed batch)."""
    def column(value):
        if value is None or isinstance(value, (int, float)):
            return [value] * batch
        return [int(v) for v in value.tolist()]
    per_block = [list(zip(column(r["heads"]), column(r["hidden"]), column(r["mlp_tokens"])))
                 for r in trace if r.get("layer") is not None]  # not the decision networks' MACs
    return [tuple(block[i] for block in per_block) for i in range(batch)]


def _numbers(v):
    return v.detach().double().cpu() if isinstance(v, Tensor) else v


def as_runner(module: nn.Module) -> LeanViT:
    if isinstance(module, LeanViT):
        return module
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
