"""From a dataset to batches for a model: the model's evaluation preprocessing and class names,
the collate function that drops unreadable images into ``Batch.skipped``, the DataLoader, and each
torchrun process's share of the batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .cifar import CIFAR10_CLASSES
from .readers import DataError, as_seen

# --------------------------------------------------------------------------- transforms


class _ToRGB:
    """Convert any PIL mode (L, P, RGBA, CMYK, 16-bit...) to RGB as a person sees it (``as_seen``);
    a class so it pickles for workers."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return as_seen(img)

    def __repr__(self) -> str:
        return "ToRGB()"


class _Compose:
    """Minimal picklable composition (avoids depending on torchvision's Compose repr/API)."""

    def __init__(self, *fns: Callable):
        self.fns = fns

    def __call__(self, x):
        for fn in self.fns:
            x = fn(x)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.fns)) + ")"


def unwrap_model(model: Any) -> Any:
    """Find the object carrying timm's pretrained_cfg (a wrapper may hold the timm model)."""
    for _ in range(3):
        if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
            return model
        inner = getattr(model, "model", None) or getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    return None


def eval_transform(model_or_cfg: Any) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation preprocessing (resize, centre crop, normalise) from timm's data config.

    ``model_or_cfg`` is a timm model (its ``pretrained_cfg`` is used) or a dict with
    ``input_size``/``mean``/``std``/``crop_pct``/``interpolation`` (missing keys get
    timm's defaults). Images are converted to RGB first, so grayscale input works.
    """
    from timm.data import create_transform, resolve_data_config

    if isinstance(model_or_cfg, Mapping):
        cfg = resolve_data_config(pretrained_cfg=dict(model_or_cfg))
    else:
        model = unwrap_model(model_or_cfg)
        if model is None:
            # timm would silently fall back to ImageNet defaults; say so.
            warnings.warn(
                f"{type(model_or_cfg).__name__} has no timm pretrained_cfg; "
                "using timm's default ImageNet preprocessing (224x224)",
                stacklevel=2,
            )
            cfg = resolve_data_config(model=model_or_cfg)
        else:
            cfg = resolve_data_config(model=model)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    tf = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False)
    return _Compose(_ToRGB(), tf)


def model_label_names(model: Any) -> Optional[list[str]]:
    """The class names a model was trained on, where it says (``pretrained_cfg["label_names"]``:
    ``"cifar10"`` for leanvit's CIFAR models, or a list); None when it does not (timm's models)."""
    inner = unwrap_model(model)
    names = (getattr(inner, "pretrained_cfg", None) or {}).get("label_names") if inner is not None else None
    if names == "cifar10":
        return list(CIFAR10_CLASSES)
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """A collated batch. ``skipped`` lists unreadable images dropped from it.

    ``len(batch)`` is the number of images kept (may be 0: then ``images`` has shape
    ``(0, 3, 0, 0)``, as the size of images that could not be read is unknown).
    """

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[str] = field(default_factory=list)
    boxes: Optional[torch.Tensor] = None  # (B, 4) object boxes as fractions of the image, where known

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.skipped, self.boxes)

    def pin_memory(self) -> "Batch":
        """What a DataLoader with ``pin_memory=True`` calls: page-locked copies for asynchronous
        host-to-GPU transfer."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped, self.boxes)


def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, Image.Image):  # no transform: uint8 CHW, as torchvision's pil_to_tensor
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return torch.as_tensor(img)


def collate(items: list) -> Batch:
    """Stack good ``(image, label)`` items; ``(None, path)`` items go to ``Batch.skipped``.
    ``(image, label, box)`` items (cluttered sets) also stack their boxes into ``Batch.boxes``.

    A module-level function so DataLoader workers can pickle it.
    """
    boxes = [it[2] for it in items if it[0] is not None and len(it) > 2]
    good = [(it[0], it[1]) for it in items if it[0] is not None]
    skipped = [it[1] for it in items if it[0] is None]
    labels = torch.tensor([y for _, y in good], dtype=torch.long)
    if not good:
        return Batch(torch.empty((0, 3, 0, 0)), labels, skipped)
    imgs = [_as_tensor(x) for x, _ in good]
    try:
        images = torch.stack(imgs)
    except RuntimeError as err:
        sizes = sorted({tuple(t.shape) for t in imgs})
        raise DataError(f"images in a batch differ in shape {sizes[:4]}; give load_dataset a "
                        f"transform (e.g. eval_transform(model)) that resizes them") from err
    return Batch(images, labels, skipped, torch.stack(boxes) if boxes and len(boxes) == len(good) else None)


def make_loader(
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: Optional[int] = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    shard: Optional[tuple[int, int]] = None,
) -> DataLoader:
    """DataLoader yielding :class:`Batch` objects; unreadable images are skipped, not fatal.

    ``num_workers`` defaults to ``min(2, cpu_count)``; ``0`` loads in this process.
    ``seed`` fixes the shuffle order (and the workers' base seed). ``pin_memory``: for a CUDA
    target. ``shard=(rank, world)``: this process's share, see :func:`batch_shard`.
    """
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    if shard is not None and shard[1] > 1:
        if shuffle:
            raise ValueError("make_loader: a shard is cut from the data set's order; do not shuffle it")
        dataset = Subset(dataset, batch_shard(len(dataset), batch_size, *shard))
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=collate, drop_last=drop_last, generator=gen, persistent_workers=False,
    )


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Process ``rank``'s share of ``n`` items among ``world``: the whole batches rank, rank +
    world, ... of the unsharded order. The shares are disjoint and cover every item, and every
    batch holds the images it holds in one process (the same logits, whatever the world size)."""
    return [i for start in range(rank * batch_size, n, world * batch_size)
            for i in range(start, min(start + batch_size, n))]


