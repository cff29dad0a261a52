"""Cluttered CIFAR-10: a CIFAR-10 object pasted at a random scale and place on a textured canvas.

On plain CIFAR-10 the object fills the frame, so which tokens a method keeps matters little and
every image needs about the same computation. Here the object covers anywhere from a few percent
to a third of the canvas and the rest is natural-image texture that carries no label: keeping the
object's tokens matters, and images differ in how much of them there is.

* objects come from CIFAR-10's split of the same name (train for training, test for testing);
* the background is a small random crop of *another* image of that split, upscaled to the canvas,
  blurred and at reduced contrast (texture, never a flat colour, which would make the object
  trivial to find);
* every image records its object's box, as fractions of the canvas ``(x0, y0, x1, y1)``;
* a test image is a function of its object's index alone (seeded by it), so the test set is the
  same on every machine and a subset holds the same images as the whole; a training image draws
  new placements from torch's random state, which the trainings seed per (seed, epoch, index).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from .readers import DataError, LabeledImages

__all__ = ["ClutterRecipe", "ClutteredImages", "CLUTTERED_NAMES", "is_cluttered_spec", "cluttered_source"]

# what --data takes for this set: the name alone (CIFAR-10 from the default locations), the
# embedded 2,000-image sample, or "cluttered:<any CIFAR-10 spec>"
CLUTTERED_NAMES = {"cluttered-cifar10": None, "cluttered-cifar10-sample": "cifar10-sample"}
PREFIX = "cluttered:"


@dataclass(frozen=True)
class ClutterRecipe:
    """How an image is composed. ``scale``: the object's side in pixels, drawn uniformly (CIFAR
    objects are square); ``crop``: the side of the background crop; ``blur``: Gaussian radius
    applied after upscaling; ``contrast``: the background's contrast around its mean."""

    canvas: int = 64
    scale: tuple = (16, 40)
    crop: int = 16
    blur: float = 2.0
    contrast: float = 0.6

    def __post_init__(self):
        lo, hi = self.scale
        if not (4 <= lo <= hi <= self.canvas):
            raise ValueError(f"clutter scale {self.scale} must satisfy 4 <= low <= high <= canvas {self.canvas}")
        if not (0.0 <= self.contrast <= 1.0) or self.blur < 0 or not (1 <= self.crop <= 32):
            raise ValueError(f"clutter background: contrast in [0, 1], blur >= 0, crop in [1, 32]; got {self}")


def is_cluttered_spec(spec) -> bool:
    return isinstance(spec, str) and (spec in CLUTTERED_NAMES or spec.startswith(PREFIX))


def cluttered_source(spec: str) -> Optional[str]:
    """The CIFAR-10 spec a cluttered spec draws its objects from (None: the default locations)."""
    if spec in CLUTTERED_NAMES:
        return CLUTTERED_NAMES[spec]
    source = spec[len(PREFIX):]
    if not source:
        raise DataError(f"--data {spec}: name the CIFAR-10 to draw objects from, e.g. cluttered:cifar10-sample")
    return source


def _decoded(source: LabeledImages) -> np.ndarray:
    """(N, 32, 32, 3) uint8 pixels of every source image (decoded once: the set is small)."""
    first = source._array
    if first is not None:
        return np.asarray(first)
    pixels = []
    for i in range(len(source)):
        img, _ = LabeledImages.__getitem__(_untransformed(source), i)
        if img is None:
            raise DataError(f"{source.path(i)}: unreadable, and a cluttered image needs every object")
        pixels.append(np.asarray(img.convert("RGB").resize((32, 32), Image.BICUBIC)))
    return np.stack(pixels)


def _untransformed(source: LabeledImages) -> LabeledImages:
    return source if source.transform is None else source.subset(range(len(source)))


class ClutteredImages(LabeledImages):
    """``dataset[i]`` is ``(image, label, box)``: the composed canvas (through ``transform``), the
    object's CIFAR label and its box as fractions of the canvas.

    ``pixels``/``targets``: the source split's images and labels (the whole split: backgrounds are
    drawn from all of it); ``ids``: which source images this set's items are (a subset keeps them).
    """

    has_boxes = True

    def __init__(self, pixels: np.ndarray, targets: Sequence[int], classes: list, root: str, split: str,
                 *, train: bool, recipe: ClutterRecipe = ClutterRecipe(), ids: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None, seed: int = 0):
        if len(pixels) < 2:
            raise DataError(f"{root}: a cluttered image needs at least 2 source images, got {len(pixels)}")
        self.pixels, self.all_targets = pixels, list(targets)
        self.ids = list(range(len(pixels))) if ids is None else [int(i) for i in ids]
        self.recipe, self.train, self.seed = recipe, train, seed
        super().__init__([f"{root}[{i}]" for i in self.ids], [self.all_targets[i] for i in self.ids], classes,
                         root, transform=transform, split=split)

    def rng(self, i: int) -> np.random.Generator:
        if self.train:  # new placements every epoch: torch's state is seeded per (seed, epoch, index)
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        return np.random.default_rng([self.seed, self.ids[i]])

    def compose(self, i: int):
        """(PIL canvas, box) of item ``i``."""
        r, rng = self.recipe, self.rng(i)
        obj = self.ids[i]
        other = (obj + 1 + int(rng.integers(len(self.pixels) - 1))) % len(self.pixels)
        background = self._background(self.pixels[other], rng)
        side = int(rng.integers(r.scale[0], r.scale[1] + 1))
        x0, y0 = (int(rng.integers(0, r.canvas - side + 1)) for _ in range(2))
        background.paste(Image.fromarray(self.pixels[obj]).resize((side, side), Image.BICUBIC), (x0, y0))
        box = np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32) / r.canvas
        return background, box

    def _background(self, pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
        r = self.recipe
        h, w = pixels.shape[:2]
        top, left = int(rng.integers(0, h - r.crop + 1)), int(rng.integers(0, w - r.crop + 1))
        crop = pixels[top:top + r.crop, left:left + r.crop].astype(np.float32)
        crop = crop.mean(axis=(0, 1)) + r.contrast * (crop - crop.mean(axis=(0, 1)))
        img = Image.fromarray(crop.round().clip(0, 255).astype(np.uint8)).resize((r.canvas, r.canvas), Image.BICUBIC)
        return img.filter(ImageFilter.GaussianBlur(r.blur)) if r.blur else img

    def __getitem__(self, i: int):
        i = range(len(self))[i]
        img, box = self.compose(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i], torch.from_numpy(box)

    def subset(self, indices, transform: Optional[Callable] = None) -> "ClutteredImages":
        return ClutteredImages(self.pixels, self.all_targets, self.classes, self.root, self.split, train=self.train,
                               recipe=self.recipe, ids=[self.ids[i] for i in indices], transform=transform,
                               seed=self.seed)

    def for_evaluation(self) -> "ClutteredImages":
        """Placements seeded by the object's index, also on the training split (held-out images)."""
        fixed = self.subset(range(len(self)), self.transform)
        fixed.train = False
        return fixed

    def __repr__(self) -> str:
        return (f"ClutteredImages({len(self)} images on a {self.recipe.canvas}px canvas, split={self.split!r}, "
                f"objects from {self.root!r})")


def cluttered_from(source: LabeledImages, split: str, recipe: ClutterRecipe = ClutterRecipe(),
                   transform: Optional[Callable] = None) -> ClutteredImages:
    """A cluttered set over every image of ``source`` (one split of CIFAR-10)."""
    return ClutteredImages(_decoded(source), source.targets, source.classes, f"cluttered({source.root})", split,
                           train=split == "train", recipe=recipe, transform=transform)
