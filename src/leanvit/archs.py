"""Architectures of leanvit's reference models, registered with timm so `timm.create_model` and
`--model` know them by name.

The reference models are timm VisionTransformers with 12 pre-norm blocks on 32x32 CIFAR images:
65 tokens (CLS + an 8x8 grid), so that the papers' decision layers 3, 6, 9 carry over. The patch
embedding is a small convolutional stem ("Early convolutions help transformers see better"),
which trains much faster on a CPU budget than a 4x4 patchify; every reduction happens in the
transformer blocks, which stay timm blocks.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

CIFAR10_MEAN = (0.4913, 0.4821, 0.4465)  # of the JPEG train split (../shared/data/README.md)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

__all__ = ["conv_stem", "CIFAR10_MEAN", "CIFAR10_STD"]


def conv_stem(in_chans: int = 3, channels=(32, 64, 128), strides=(1, 2, 2)) -> nn.Sequential:
    """3x3 convs of the given strides, each with BatchNorm and ReLU (default: 32x32 -> 8x8).
    HybridEmbed adds the final 1x1 projection to the embedding width."""
    layers, c_in = [], in_chans
    for c, stride in zip(channels, strides, strict=True):
        layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


def _cifar_vit(embed_dim: int, num_heads: int, mlp_ratio: float, stem=(32, 64, 128), strides=(1, 2, 2),
               **kwargs) -> VisionTransformer:
    for unused in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    args = dict(img_size=32, patch_size=1, num_classes=10, embed_dim=embed_dim, depth=12, num_heads=num_heads,
                mlp_ratio=mlp_ratio, qkv_bias=True, global_pool="token")
    args.update(kwargs)
    in_chans = args.get("in_chans", 3)
    model = VisionTransformer(embed_layer=partial(HybridEmbed, backbone=conv_stem(in_chans, stem, strides)), **args)
    model.pretrained_cfg = dict(input_size=(in_chans, args["img_size"], args["img_size"]), mean=CIFAR10_MEAN,
                                std=CIFAR10_STD, crop_pct=1.0, interpolation="bicubic",
                                num_classes=args["num_classes"], label_names="cifar10")
    return model


@register_model
def vit12_convstem_w128_cifar(pretrained=False, **kwargs) -> VisionTransformer:
    """12 blocks, width 128, 4 heads, MLP 512, conv stem to an 8x8 grid: 65 tokens at 32x32."""
    return _cifar_vit(128, 4, 4.0, **kwargs)


@register_model
def vit12_convstem_w96_cifar(pretrained=False, **kwargs) -> VisionTransformer:
    """12 blocks, width 96, 3 heads, MLP 384, conv stem to an 8x8 grid: 65 tokens at 32x32."""
    return _cifar_vit(96, 3, 4.0, stem=(24, 48, 96), **kwargs)


@register_model
def vit12_convstem_w128_cluttered(pretrained=False, **kwargs) -> VisionTransformer:
    """The w128 model for cluttered CIFAR-10 (64x64 canvas): the same blocks, a stem of three
    stride-2 convs to the same 8x8 grid, so it costs what the 32x32 model costs."""
    return _cifar_vit(128, 4, 4.0, strides=(2, 2, 2), img_size=64, **kwargs)
