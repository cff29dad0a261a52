"""Shared fixtures for the leanvit core tests: small random-weight timm ViTs, seeded.

Every model here is built with random weights (never ``pretrained=True``). Random ViTs have
near-uniform attention, so :func:`sharpen` scales the qkv weights up to make attention (and
therefore every method's decisions) far from uniform.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from leanvit import Reduction
from leanvit.data import EMBEDDED_CIFAR10
from leanvit.methods.base import AttentionView
from leanvit.tokens import keep_mask

# two pytest-xdist workers share the 2 cores of CI: one thread each instead of 2x oversubscription
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, num_classes=10)
N_SMALL = (32 // 4) ** 2 + 1  # 65 tokens: 64 patches + CLS


def cifar_for_tests() -> Path:
    """CIFAR-10 for the tests that train: the sample shipped in the package (so every machine runs
    the same tests, ../shared or not), its 2,000 test images split into ``train/`` (the first 100
    per class) and ``test/`` (the other 100). Built once into the temp dir, atomically."""
    digest = hashlib.sha256(EMBEDDED_CIFAR10.read_bytes()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"leanvit-tests-{digest}" / "cifar10-splits.tar"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tarfile.open(EMBEDDED_CIFAR10) as src, tarfile.open(tmp, "w") as dst:
        members = sorted((m for m in src.getmembers() if m.isfile()), key=lambda m: m.name)
        seen: dict = {}
        for m in members:
            _, cls, _ = m.name.split("/")
            seen[cls] = seen.get(cls, 0) + 1
            info = tarfile.TarInfo(f"{'train' if seen[cls] <= 100 else 'test'}/{cls}/{m.name.rsplit('/', 1)[1]}")
            blob = src.extractfile(m).read()
            info.size = len(blob)
            dst.addfile(info, io.BytesIO(blob))
    os.replace(tmp, path)
    return path


CIFAR = cifar_for_tests()


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Every device present: CPU here, CUDA (and MPS) where there is one. Tests that take ``device``
# run once per device, so that a GPU machine runs them on its GPU with no change.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) \
    + (["mps"] if torch.backends.mps.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    seed_all(0)
    yield


def sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale every block's qkv weights so attention is peaked and decisions are non-trivial."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(factor)
    return model


def small_vit(seed: int = 0, distilled: bool = False, sharp: float = 0.0, **overrides) -> VisionTransformer:
    """A 32x32 / patch 4 ViT (65 tokens), depth 12, width 64, 4 heads, in eval mode."""
    seed_all(seed)
    kw = dict(SMALL)
    kw.update(overrides)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(**kw).eval()
    if sharp:
        sharpen(model, sharp)
    return model


def images(batch: int, size=32, seed: int = 1, chans: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, chans, h, w, generator=g)


def run_traced(f, x, track_source: bool = True):
    """Eval forward under tracing: (logits, trace, last_state)."""
    with torch.no_grad(), f.tracing(track_source=track_source) as trace:
        y = f(x)
    return y, trace, f.last_state


def mlp_counts(trace):
    """(depth, B) tokens the MLP of each block ran on (per image)."""
    return torch.stack([rec["mlp_tokens"] for rec in trace if rec["layer"] is not None]).tolist()


_DEIT_CACHE = {}


def deit(size: str) -> torch.nn.Module:
    """deit_{tiny,small,base}_patch16_224 with random weights, cached for the session, eval mode."""
    if size not in _DEIT_CACHE:
        seed_all(0)
        _DEIT_CACHE[size] = timm.create_model(f"deit_{size}_patch16_224", pretrained=False)
    return _DEIT_CACHE[size].eval()


@pytest.fixture
def x224():
    return images(1, 224, seed=3)


class AboveMean(Reduction):
    """Test method: keep, per image, the patches whose significance is above that image's mean.

    A deterministic per-image decision that makes batches ragged, so the padded (masked) batch
    can be compared with each image alone (a batch of 1 has no padding)."""

    name = "test-above-mean"

    def __init__(self, layers):
        self.layers = tuple(layers)

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn: AttentionView):
        s = attn.significance  # zero on padding, sums to 1 over the real patches
        n = (state.counts() - state.n_prefix).to(s.dtype)
        return keep_mask(state, s >= 1.0 / n[:, None])


# the fixed-count methods on small_vit(depth=4) (65 tokens, 4 blocks): compile and export tests
STATIC_METHODS = {
    "none": {},
    "tome": dict(r=8),
    "evit": dict(keep_rate=0.7, layers=(1, 2)),
    "ppt": dict(r=8, layers=(1, 2)),
    "random": dict(keep_rate=0.7, layers=(1, 2), fixed=True),
    "channels": dict(heads=0.5, mlp=0.5),
}
