"""Readers of labelled images on disk: an ImageFolder directory (``<root>/[<split>/]<class>/<img>``)
and a tar archive of ``[<split>/]<class>/<img>`` read into memory without extracting anything; the
dataset they return (:class:`LabeledImages`, decoding lazily per item); and the label bookkeeping
every reader shares (labels of class folders, the model's classes, class-balanced subsets).

Images that cannot be decoded never raise: the dataset returns ``(None, path)`` and a warning.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .entries import Walk, image_members, walk_images

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Same list as torchvision's ImageFolder (plus .jfif), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folder names that mark a split level rather than a class level.
SPLIT_NAMES = ("train", "val", "test", "validation")
# Which folder names may serve a requested split, in order of preference.
SPLIT_ALIASES = {
    "val": ("val", "test", "validation"),
    "validation": ("validation", "val", "test"),
    "test": ("test", "val", "validation"),
    "train": ("train",),
}
_WNID = re.compile(r"n\d{8}")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

ACCEPTED_LAYOUTS = (
    "an ImageFolder directory (<root>/<class>/<img> or <root>/<split>/<class>/<img>), "
    "a .tar/.tar.gz/.tgz archive of <split>/<class>/<img> or <class>/<img>, "
    "or a torchvision CIFAR-10 download (the cifar-10-batches-py directory or its parent)"
)
# what a --data option takes (the command line's help)


class DataError(ValueError):
    """A user-facing data problem: the message says what was expected and where we looked."""


# --------------------------------------------------------------------------- dataset


_warned: set[str] = set()


def _warn_bad(path: str, err: BaseException) -> None:
    # Once per path per process: a re-run over the same data should not flood the log.
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=3)


def _decode(src: Union[str, bytes]) -> Image.Image:
    """Open and fully decode an image (so truncated files fail here, not in the transform)."""
    with Image.open(src if isinstance(src, str) else io.BytesIO(src)) as img:
        img.load()
        return as_seen(img)


def as_seen(img: Image.Image) -> Image.Image:
    """The RGB picture a person sees in ``img``, whatever its mode: upright (EXIF orientation),
    16- and 32-bit gray scaled to 8 bits (not clipped to white), palette colours, CMYK as colours,
    and transparency composited on a white background (as a viewer or a page shows it)."""
    from PIL import ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0  # a float image in [0, 1]
        elif img.mode != "F":
            a = a / 257.0  # 16-bit range (what PNG and TIFF hold; 32-bit "I" images are 16-bit ones)
        img = Image.fromarray(np.nan_to_num(a).clip(0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class LabeledImages(Dataset):
    """Images with integer labels; ``dataset[i]`` is ``(image, label)`` or ``(None, path)``.

    Built by :func:`load_dataset`. Images come from files on disk, from bytes held in
    memory (tar archives) or from a uint8 array (CIFAR pickles); they are decoded lazily
    per item. ``image`` is the transform's output, or the RGB PIL image if there is no
    transform. An image that cannot be read gives ``(None, path)`` and a warning.
    """

    def __init__(
        self,
        paths: list[str],
        targets: list[int],
        classes: list[str],
        root: str,
        *,
        transform: Optional[Callable] = None,
        blobs: Optional[list[bytes]] = None,
        array: Optional[np.ndarray] = None,
        split: Optional[str] = None,
        skipped_folders: Optional[list[str]] = None,
        skipped_files: Optional[list[str]] = None,
    ):
        n = len(paths)
        if len(targets) != n or (blobs is not None and len(blobs) != n) or (array is not None and len(array) != n):
            raise ValueError("paths, targets and image storage must have the same length")
        self.paths = paths
        self.targets = targets
        self.classes = classes
        self.root = root
        self.split = split
        # folders a directory walk could not read (or that lead back to one already read)
        self.skipped_folders = list(skipped_folders or [])
        # entries that are not regular image files of their class (FIFOs, devices, links out of it), not opened
        self.skipped_files = list(skipped_files or [])
        self.transform = transform
        self._blobs = blobs
        self._array = array

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        """Where item ``i`` came from (a file, ``archive:member`` or ``batch_file[row]``)."""
        return self.paths[i]

    def __getitem__(self, i: int):
        i = range(len(self))[i]  # bounds check + negative indices
        try:
            if self._array is not None:
                img = Image.fromarray(self._array[i])  # HWC uint8, already RGB
            elif self._blobs is not None:
                img = _decode(self._blobs[i])
            else:
                img = _decode(self.paths[i])
        except Exception as err:  # corrupt, truncated, unreadable: report, never raise
            _warn_bad(self.paths[i], err)
            return None, self.paths[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    def subset(self, indices, transform: Optional[Callable] = None) -> "LabeledImages":
        """The images at ``indices`` (sharing their storage), with ``transform``."""
        ix = list(indices)
        return LabeledImages(
            [self.paths[i] for i in ix], [self.targets[i] for i in ix], self.classes, self.root,
            transform=transform, split=self.split, skipped_folders=self.skipped_folders,
            skipped_files=self.skipped_files,
            blobs=None if self._blobs is None else [self._blobs[i] for i in ix],
            array=None if self._array is None else self._array[ix])

    has_boxes = False  # items are (image, label); cluttered sets add each object's box

    def for_evaluation(self) -> "LabeledImages":
        """These images as an evaluation reads them: the same on every pass (for sets that
        compose their images, such as cluttered CIFAR-10's training split)."""
        return self

    def __repr__(self) -> str:
        return (f"LabeledImages({len(self)} images, {len(self.classes)} classes, "
                f"split={self.split!r}, root={self.root!r})")


# --------------------------------------------------------------------------- labels & subsets


def label_map(classes: list[str], num_classes: Optional[int], where: str) -> list[int]:
    """Label for each class index; maps ImageNet wnids into a 1000-way model's output space."""
    k = len(classes)
    if num_classes is None or num_classes == k:
        return list(range(k))
    if num_classes == 1000 and all(_WNID.fullmatch(c) for c in classes):
        from timm.data import ImageNetInfo

        index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise DataError(f"{where}: class folders {unknown[:5]} are not ImageNet-1k wnids")
        return [index[c] for c in classes]
    shown = ", ".join(classes[:5]) + (", ..." if k > 5 else "")
    raise DataError(
        f"data set at {where} has {k} classes ({shown}) but the model predicts "
        f"num_classes={num_classes}; use data with the model's classes (ImageNet wnid "
        f"folders n######## are accepted for a 1000-class model)"
    )



def check_classes(classes: list[str], expected: Optional[list[str]], where: str, strict: bool = True) -> None:
    """Refuse (``strict``) or warn about a data set whose class folders are not the model's labels:
    class i of the data is scored as the model's output i, so other names mean a wrong top-1."""
    if expected is None or [c.lower() for c in classes] == [c.lower() for c in expected]:
        return
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    want = ", ".join(expected[:5]) + (", ..." if len(expected) > 5 else "")
    msg = (f"the classes of {where} ({shown}) are not the model's labels ({want}); class folders are "
           "matched to the model's outputs by name, in sorted order")
    if strict:
        raise DataError(msg + ": rename the folders to the model's labels, or use data of the model's classes")
    log.warning("leanvit: warning: %s; the training relearns the labels from the folders", msg)


def balanced_subset(class_idx: list[int], limit: Optional[int], seed: int) -> list[int]:
    """Indices of a deterministic subset of ``limit`` items spread evenly over classes.

    Each class's items are shuffled with ``seed``, then classes are taken round-robin, so
    even ``limit == number of classes`` sees every class once. Returned in index order.
    """
    n = len(class_idx)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    if limit is None or limit >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(class_idx):
        by_class.setdefault(c, []).append(i)
    order = [by_class[c] for c in sorted(by_class)]
    order = [list(rng.permutation(ix)) for ix in order]
    rng.shuffle(order)  # which classes get the extra item when limit % K != 0
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for ix in order:
            if depth < len(ix):
                picked.append(int(ix[depth]))
                if len(picked) == limit:
                    break
        depth += 1
    return sorted(picked)


# --------------------------------------------------------------------------- sources


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # "._x.jpg" are macOS resource forks, not images.
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _member_parts(name: str) -> list[str]:
    """'./val/cls/x.jpg' -> ['val', 'cls', 'x.jpg']."""
    return [p for p in name.split("/") if p not in ("", ".")]


def _choose_split(available: set[str], split: str, where: str) -> str:
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in available:
            return name
    raise DataError(
        f"{where} holds the splits {sorted(available)} but none for split={split!r} "
        f"(looked for {list(SPLIT_ALIASES.get(split, (split,)))})"
    )


# What a damaged archive raises while it is read: a gzip stream that ends early (EOFError),
# a bad block (TarError), bad compressed data (zlib.error) or a read error (OSError).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def load_tar(path: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    """Read one split of a tar archive into memory (no extraction); decode lazily later."""
    try:
        return _read_tar(path, split, num_classes, limit, seed, transform)
    except ARCHIVE_ERRORS as err:
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); download or "
                        "create the archive again") from err


def _check_complete(tf: tarfile.TarFile) -> None:
    """tarfile stops without a word where an archive is cut between members (or holds garbage
    there); a complete archive has a zero block (the end-of-archive marker) after its last member."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
        raise EOFError(f"it ends after {len(tf.getmembers())} members without the end-of-archive marker")


def _read_tar(path: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    where = str(path)
    with tarfile.open(path, "r:*") as tf:
        members, skipped = image_members(tf, where, is_image_name)
        _check_complete(tf)
        parts = [_member_parts(m.name) for m in members]
        # Drop a single wrapper directory (e.g. "imagenette2/val/<class>/<img>").
        while parts and all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1 \
                and parts[0][0] not in SPLIT_NAMES:
            parts = [p[1:] for p in parts]
        if any(len(p) >= 3 and p[0] in SPLIT_NAMES for p in parts):
            chosen = _choose_split({p[0] for p in parts if len(p) >= 3}, split, where)
            keep = [(m, p[1]) for m, p in zip(members, parts) if len(p) >= 3 and p[0] == chosen]
            root = f"{where}:{chosen}/"
        else:
            chosen = None
            keep = [(m, p[0]) for m, p in zip(members, parts) if len(p) >= 2]
            root = where
        if not keep:
            raise DataError(f"{where} contains no images in <split>/<class>/<img> or <class>/<img> "
                            f"layout (found {len(members)} image files); expected {ACCEPTED_LAYOUTS}")
        keep.sort(key=lambda mc: (mc[1], mc[0].name))
        classes = sorted({c for _, c in keep})
        cidx = {c: i for i, c in enumerate(classes)}
        class_idx = [cidx[c] for _, c in keep]
        labels = label_map(classes, num_classes, root)  # fail before reading the bytes
        sel = balanced_subset(class_idx, limit, seed)
        # Read in archive order: a gzip stream can only seek forward cheaply.
        blobs: dict[int, bytes] = {}
        for i in sorted(sel, key=lambda i: keep[i][0].offset_data):
            try:
                f = tf.extractfile(keep[i][0])  # a hard link reads the member it names
            except KeyError:  # a hard link to a member the archive does not hold: unreadable
                f = None
            blobs[i] = f.read() if f is not None else b""
    return LabeledImages(
        paths=[f"{where}:{keep[i][0].name}" for i in sel],
        targets=[labels[class_idx[i]] for i in sel],
        classes=classes, root=root, transform=transform,
        blobs=[blobs[i] for i in sel], split=chosen or split, skipped_files=skipped,
    )



def _subdirs(d: Path) -> list[str]:
    """Names of the visible sub-folders of ``d``, sorted; an unreadable ``d`` is a DataError."""
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise DataError(f"cannot read the folder {d} ({err}); check its permissions") from err


def load_folder(root: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    """ImageFolder layout, either at ``root`` or under ``root/<split>``."""
    top = _subdirs(root)
    split_dirs = {n for n in top if n in SPLIT_NAMES and _subdirs(root / n)}
    base, chosen = root, None
    if split_dirs:
        chosen = _choose_split(split_dirs, split, str(root))
        base = root / chosen
        top = _subdirs(base)
    items: list[tuple[str, int]] = []
    walk = Walk.of(base, top)
    for ci, cls in enumerate(top):
        items += [(path, ci) for path in walk_images(base / cls, walk, is_image_name)]
    skipped = walk.folders
    if skipped:
        log.warning("%s: skipped %d folder(s) (first: %s)", base, len(skipped), skipped[0])
    if walk.files:
        log.warning("%s: skipped %d file(s) that are not regular image files of their class (first: %s)",
                    base, len(walk.files), walk.files[0])
    if not items:
        loose = [n for n in os.listdir(base) if is_image_name(n)]
        archives = [n for n in os.listdir(base) if n.lower().endswith(ARCHIVE_SUFFIXES)]
        hint = ""
        if loose:
            hint = f" ({len(loose)} images lie directly in it: put them in one folder per class)"
        elif archives:
            hint = f" (it holds the archive(s) {archives[:3]}: pass the archive's path)"
        raise DataError(f"no images found in {base}{hint}; expected {ACCEPTED_LAYOUTS}")
    classes = top
    class_idx = [c for _, c in items]
    labels = label_map(classes, num_classes, str(base))
    sel = balanced_subset(class_idx, limit, seed)
    return LabeledImages(
        paths=[items[i][0] for i in sel], targets=[labels[class_idx[i]] for i in sel],
        classes=classes, root=str(base), transform=transform, split=chosen or split, skipped_folders=skipped,
        skipped_files=walk.files,
    )


