"""Evaluation data: find, load and batch labelled images for scoring a model.

Three on-disk forms are accepted (see :func:`load_dataset`):

* an ImageFolder directory, ``<root>/<class>/<img>`` or ``<root>/<split>/<class>/<img>``;
* a tar archive (``.tar``, ``.tar.gz``, ``.tgz``) of ``[<split>/]<class>/<img>``, read
  into memory without extracting anything to disk;
* a torchvision CIFAR-10 download (``cifar-10-batches-py`` or its parent directory).

Two names stand for data sets instead of a path (a file or folder of that name wins):
``cifar10-sample``, the 2,000 CIFAR-10 test images embedded in the package, and ``cifar10``,
the full CIFAR-10 in ``~/.cache/leanvit/``, downloaded through torchvision on first use.

Images that cannot be decoded never raise: the dataset returns ``(None, path)`` and
the loader's collate function drops them and lists them in ``Batch.skipped``, so an
evaluation can report exactly what it did not score.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import tarfile
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "CIFAR10_CLASSES",
    "EMBEDDED_CIFAR10",
    "Batch",
    "DataError",
    "download_cifar10",
    "LabeledImages",
    "balanced_subset",
    "describe_search",
    "eval_transform",
    "find_default_cifar10",
    "load_dataset",
    "make_loader",
    "model_label_names",
    "resolve_data",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# Same list as torchvision's ImageFolder (plus .jfif), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folder names that mark a split level rather than a class level.
_SPLIT_NAMES = ("train", "val", "test", "validation")
# Which folder names may serve a requested split, in order of preference.
_SPLIT_ALIASES = {
    "val": ("val", "test", "validation"),
    "validation": ("validation", "val", "test"),
    "test": ("test", "val", "validation"),
    "train": ("train",),
}
_WNID = re.compile(r"n\d{8}")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

ACCEPTED_LAYOUTS = (
    "an ImageFolder directory (<root>/<class>/<img> or <root>/<split>/<class>/<img>), "
    "a .tar/.tar.gz/.tgz archive of <split>/<class>/<img> or <class>/<img>, "
    "or a torchvision CIFAR-10 download (the cifar-10-batches-py directory or its parent)"
)
# what a --data option takes (the command line's help)
DATA_HELP = ("an ImageFolder dir, a tar of [<split>/]<class>/<img>, a cifar-10-batches-py dir, or a name: "
             "cifar10 (the full CIFAR-10, downloaded into ~/.cache/leanvit) or cifar10-sample (2,000 CIFAR-10 "
             "test images shipped with leanvit); default for training/sweep: CIFAR-10 from the standard locations")

# Where this file lives in a source checkout: src/leanvit/data.py -> repo root.
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CIFAR_ARCHIVE = "cifar10-jpeg.tar.gz"
_CIFAR_BATCHES = "cifar-10-batches-py"
# The demo's 2,000-image class-balanced CIFAR-10 test subset, shipped as package data
# (assets/README.md says what it is; tools/make_cifar10_sample.py builds it).
EMBEDDED_CIFAR10 = Path(__file__).resolve().parent / "assets" / "cifar10-test-2000.tar.gz"
SAMPLE_NAME, DOWNLOAD_NAME = "cifar10-sample", "cifar10"


class DataError(ValueError):
    """A user-facing data problem: the message says what was expected and where we looked."""


# --------------------------------------------------------------------------- transforms


class _ToRGB:
    """Convert any PIL mode (L, P, RGBA, CMYK...) to RGB; a class so it pickles for workers."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

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


def _unwrap_model(model: Any) -> Any:
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
        model = _unwrap_model(model_or_cfg)
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
            blobs=None if self._blobs is None else [self._blobs[i] for i in ix],
            array=None if self._array is None else self._array[ix])

    def __repr__(self) -> str:
        return (f"LabeledImages({len(self)} images, {len(self.classes)} classes, "
                f"split={self.split!r}, root={self.root!r})")


# --------------------------------------------------------------------------- labels & subsets


def _label_map(classes: list[str], num_classes: Optional[int], where: str) -> list[int]:
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


def model_label_names(model: Any) -> Optional[list[str]]:
    """The class names a model was trained on, where it says (``pretrained_cfg["label_names"]``:
    ``"cifar10"`` for leanvit's CIFAR models, or a list); None when it does not (timm's models)."""
    inner = _unwrap_model(model)
    names = (getattr(inner, "pretrained_cfg", None) or {}).get("label_names") if inner is not None else None
    if names == "cifar10":
        return list(CIFAR10_CLASSES)
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


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


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # "._x.jpg" are macOS resource forks, not images.
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _member_parts(name: str) -> list[str]:
    """'./val/cls/x.jpg' -> ['val', 'cls', 'x.jpg']."""
    return [p for p in name.split("/") if p not in ("", ".")]


def _choose_split(available: set[str], split: str, where: str) -> str:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if name in available:
            return name
    raise DataError(
        f"{where} holds the splits {sorted(available)} but none for split={split!r} "
        f"(looked for {list(_SPLIT_ALIASES.get(split, (split,)))})"
    )


# What a damaged archive raises while it is read: a gzip stream that ends early (EOFError),
# a bad block (TarError), bad compressed data (zlib.error) or a read error (OSError).
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _load_tar(path: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    """Read one split of a tar archive into memory (no extraction); decode lazily later."""
    try:
        return _read_tar(path, split, num_classes, limit, seed, transform)
    except _ARCHIVE_ERRORS as err:
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
        members = [m for m in tf.getmembers() if m.isfile() and _is_image_name(m.name)]
        _check_complete(tf)
        parts = [_member_parts(m.name) for m in members]
        # Drop a single wrapper directory (e.g. "imagenette2/val/<class>/<img>").
        while parts and all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1 \
                and parts[0][0] not in _SPLIT_NAMES:
            parts = [p[1:] for p in parts]
        if any(len(p) >= 3 and p[0] in _SPLIT_NAMES for p in parts):
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
        labels = _label_map(classes, num_classes, root)  # fail before reading the bytes
        sel = balanced_subset(class_idx, limit, seed)
        # Read in archive order: a gzip stream can only seek forward cheaply.
        blobs: dict[int, bytes] = {}
        for i in sorted(sel, key=lambda i: keep[i][0].offset_data):
            f = tf.extractfile(keep[i][0])
            blobs[i] = f.read() if f is not None else b""
    return LabeledImages(
        paths=[f"{where}:{keep[i][0].name}" for i in sel],
        targets=[labels[class_idx[i]] for i in sel],
        classes=classes, root=root, transform=transform,
        blobs=[blobs[i] for i in sel], split=chosen or split,
    )


def _cifar_batches_dir(d: Path) -> Optional[Path]:
    """The torchvision CIFAR-10 directory at or directly under ``d``, if any."""
    for cand in (d, d / _CIFAR_BATCHES):
        if cand.is_dir() and ((cand / "test_batch").is_file() or (cand / "data_batch_1").is_file()):
            return cand
    return None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # What Python 3 pickles of bytes call (``_codecs.encode(text, 'latin1')``); no other codec.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a CIFAR-10 batch")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch holds: builtin containers, bytes, str, numbers and numpy
    arrays. Any other global (``os.system``, ``builtins.eval``, ...) is refused before it runs."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only "
                                     "dicts, lists, bytes, str, numbers and numpy arrays")


def _unpickle(f: Path) -> dict:
    # The official files are Python 2 pickles holding numpy arrays: latin1 is what numpy
    # needs for those, as in torchvision. The restricted unpickler keeps a crafted file inert.
    with open(f, "rb") as fh:
        d = _CifarUnpickler(fh, encoding="latin1").load()
    if not isinstance(d, dict):
        raise pickle.UnpicklingError(f"holds a {type(d).__name__}, not a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _load_cifar_batches(d: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    """torchvision's CIFAR-10 python format: 'train' -> data_batch_1..5, 'test'/'val' -> test_batch."""
    if split == "train":
        files = sorted(d.glob("data_batch_[0-9]*"))
    elif split in _SPLIT_ALIASES:
        files = [d / "test_batch"] if (d / "test_batch").is_file() else []
    else:
        files = []
    if not files:
        raise DataError(f"{d} has no CIFAR-10 batch file for split={split!r} "
                        "(expected data_batch_1..5 for 'train', test_batch for 'test'/'val')")
    arrays, labels, paths = [], [], []
    for f in files:
        try:
            b = _unpickle(f)
            data = np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = [int(x) for x in b.get("labels", b.get("fine_labels", []))]
        except Exception as err:
            raise DataError(f"{f} is not a CIFAR-10 batch (a pickled dict with 'data' uint8 "
                            f"(N, 3072) and 'labels'): {err}") from err
        if len(lab) != len(data):
            raise DataError(f"{f}: {len(data)} images but {len(lab)} labels")
        arrays.append(data.transpose(0, 2, 3, 1))  # -> NHWC for PIL
        labels += lab
        paths += [f"{f}[{j}]" for j in range(len(data))]
    classes = list(CIFAR10_CLASSES)
    meta = d / "batches.meta"
    if meta.is_file():
        try:
            names = _unpickle(meta)["label_names"]
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
        except Exception:
            log.warning("could not read class names from %s; using the CIFAR-10 names", meta)
    if labels and max(labels) >= len(classes):
        raise DataError(f"{d}: label {max(labels)} out of range for {len(classes)} classes")
    label_of = _label_map(classes, num_classes, str(d))
    sel = balanced_subset(labels, limit, seed)
    array = np.concatenate(arrays)[sel]
    return LabeledImages(
        paths=[paths[i] for i in sel], targets=[label_of[labels[i]] for i in sel],
        classes=classes, root=str(d), transform=transform, array=np.ascontiguousarray(array),
        split=split,
    )


def _subdirs(d: Path) -> list[str]:
    """Names of the visible sub-folders of ``d``, sorted; an unreadable ``d`` is a DataError."""
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise DataError(f"cannot read the folder {d} ({err}); check its permissions") from err


def _walk_images(top: Path, skipped: list[str], seen: set[str]) -> list[str]:
    """Image files under ``top``, following links to folders, but never into a folder already read
    (``seen``, shared by all classes) or into an ancestor of ``top`` (a loop); those, and
    unreadable folders, go to ``skipped``."""
    found: list[str] = []
    top_real = os.path.realpath(top)

    def unreadable(err: OSError) -> None:
        skipped.append(f"{err.filename} (unreadable: {err.strerror})")

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if real in seen or (real != top_real and os.path.commonpath([real, top_real]) == real):
            skipped.append(f"{dirpath} (leads to {real}, already read or an ancestor: a loop)")
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        found += [os.path.join(dirpath, fn) for fn in sorted(filenames) if _is_image_name(fn)]
    return found


def _load_folder(root: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    """ImageFolder layout, either at ``root`` or under ``root/<split>``."""
    top = _subdirs(root)
    split_dirs = {n for n in top if n in _SPLIT_NAMES and _subdirs(root / n)}
    base, chosen = root, None
    if split_dirs:
        chosen = _choose_split(split_dirs, split, str(root))
        base = root / chosen
        top = _subdirs(base)
    items: list[tuple[str, int]] = []
    skipped: list[str] = []
    seen = {os.path.realpath(base)}  # a link back to the data folder would read every class again
    for ci, cls in enumerate(top):
        items += [(path, ci) for path in _walk_images(base / cls, skipped, seen)]
    if skipped:
        log.warning("%s: skipped %d folder(s) (first: %s)", base, len(skipped), skipped[0])
    if not items:
        loose = [n for n in os.listdir(base) if _is_image_name(n)]
        archives = [n for n in os.listdir(base) if n.lower().endswith(_ARCHIVE_SUFFIXES)]
        hint = ""
        if loose:
            hint = f" ({len(loose)} images lie directly in it: put them in one folder per class)"
        elif archives:
            hint = f" (it holds the archive(s) {archives[:3]}: pass the archive's path)"
        raise DataError(f"no images found in {base}{hint}; expected {ACCEPTED_LAYOUTS}")
    classes = top
    class_idx = [c for _, c in items]
    labels = _label_map(classes, num_classes, str(base))
    sel = balanced_subset(class_idx, limit, seed)
    return LabeledImages(
        paths=[items[i][0] for i in sel], targets=[labels[class_idx[i]] for i in sel],
        classes=classes, root=str(base), transform=transform, split=chosen or split, skipped_folders=skipped,
    )


def load_dataset(
    path: Optional[PathLike],
    *,
    split: str = "val",
    transform: Optional[Callable] = None,
    num_classes: Optional[int] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    classes: Optional[list[str]] = None,
) -> LabeledImages:
    """Load a labelled image set from a folder, a tar archive or a torchvision CIFAR-10 dir.

    ``path=None`` uses :func:`find_default_cifar10`; the names ``cifar10-sample`` and ``cifar10``
    are resolved by :func:`resolve_data`. Labels are sorted class-folder
    indices; if ``num_classes`` differs from the number of classes, ImageNet wnid
    folders are mapped to ImageNet-1k indices for a 1000-class model, anything else
    raises :class:`DataError`. ``limit`` keeps a seeded, class-balanced subset.
    For split ``'val'`` a ``test`` folder is accepted (and vice versa). ``classes``: the labels
    the model knows (:func:`model_label_names`); other class names are a :class:`DataError`.
    """
    ds = _load_any(resolve_data(path), split, num_classes, limit, seed, transform)
    check_classes(ds.classes, classes, ds.root)
    return ds


def _load_any(p: Path, split, num_classes, limit, seed, transform) -> LabeledImages:
    args = (split, num_classes, limit, seed, transform)
    if not p.exists():
        raise DataError(f"data path {p} does not exist; expected {ACCEPTED_LAYOUTS}")
    if p.is_file():
        try:
            is_tar = tarfile.is_tarfile(p)
        except PermissionError as err:
            raise DataError(f"cannot read {p}: {err}") from err
        except _ARCHIVE_ERRORS:  # a damaged archive: _load_tar says what is wrong with it
            is_tar = True
        if not is_tar and not p.name.lower().endswith(_ARCHIVE_SUFFIXES):
            raise DataError(f"{p} is a file but not a tar archive; expected {ACCEPTED_LAYOUTS}")
        return _load_tar(p, *args)
    if p.is_dir():
        batches = _cifar_batches_dir(p)
        if batches is not None:
            return _load_cifar_batches(batches, *args)
        return _load_folder(p, *args)
    raise DataError(f"{p} is neither a file nor a directory; expected {ACCEPTED_LAYOUTS}")


def resolve_data(path: Optional[PathLike]) -> Path:
    """The path that ``path`` names: itself if it exists; ``None`` -> :func:`find_default_cifar10`;
    ``cifar10-sample`` -> the embedded sample; ``cifar10`` -> the full set, downloaded if missing."""
    if path is None:
        found = find_default_cifar10()
        if found is None:
            raise DataError("no CIFAR-10 found; looked in:\n" + describe_search()
                            + f"\npass --data PATH (an ImageFolder dir, a tar of <split>/<class>/<img>, "
                              f"or a torchvision cifar-10-batches-py dir), --data {DOWNLOAD_NAME} to download "
                              f"it, or --data {SAMPLE_NAME} for the 2,000 test images shipped with leanvit")
        return Path(found)
    p = Path(os.fspath(path)).expanduser()
    if not p.exists() and str(path) == SAMPLE_NAME:
        return EMBEDDED_CIFAR10
    if not p.exists() and str(path) == DOWNLOAD_NAME:
        return download_cifar10()
    return p


# --------------------------------------------------------------------------- download


def cache_dir() -> Path:
    """Where leanvit keeps what it downloads: ``~/.cache/leanvit``."""
    return Path.home() / ".cache" / "leanvit"


def _md5(path: Path) -> str:
    import hashlib
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(root: Optional[PathLike] = None, timeout: float = 10.0) -> Path:
    """The full CIFAR-10 (python format) in ``root`` (default :func:`cache_dir`), downloaded through
    torchvision with a progress bar if it is not there yet; every file's md5 is checked.

    Offline, this fails within ``timeout`` seconds with a :class:`DataError` that names ``--data``.
    """
    from torchvision.datasets import CIFAR10

    root = Path(root) if root is not None else cache_dir()
    batches = root / CIFAR10.base_folder
    expected = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]

    def complete() -> bool:
        return all((batches / f).is_file() and _md5(batches / f) == md5 for f, md5 in expected)

    if complete():
        return batches
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {root} for the CIFAR-10 download ({err}); pass --data PATH") from err
    with _exclusive(root / ".download.lock"):  # torchrun's processes: one downloads, the others wait
        if not complete():
            _download_cifar10(root, timeout)
    if not complete():
        raise DataError(f"CIFAR-10 in {batches} failed its md5 check after the download; remove the folder "
                        "and try again")
    return batches


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_cifar10(root: Path, timeout: float) -> None:
    import socket
    from urllib.parse import urlparse

    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    offline = (f"cannot download CIFAR-10 from {CIFAR10.url} ({{}}); this machine seems offline: "
               f"pass --data PATH to a local copy (a cifar-10-batches-py dir, an ImageFolder dir or a tar "
               f"of <split>/<class>/<img>), or --data {SAMPLE_NAME} for the 2,000 test images shipped with leanvit")
    url = urlparse(CIFAR10.url)
    try:  # fail fast when there is no network: urllib itself would wait without a limit
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as err:
        raise DataError(offline.format(err)) from err
    log.warning("downloading CIFAR-10 (163 MB) into %s", root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(max(timeout, 30.0))  # a stalled transfer ends instead of hanging
    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5,
                                     remove_finished=True)
    except RuntimeError as err:  # torchvision's md5 check of the archive
        raise DataError(f"the CIFAR-10 download from {CIFAR10.url} failed its md5 check ({err}); "
                        "try again, or pass --data PATH") from err
    except OSError as err:  # URLError, a timeout, a full disk
        raise DataError(offline.format(err)) from err
    finally:
        socket.setdefaulttimeout(previous)


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

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.skipped)

    def pin_memory(self) -> "Batch":
        """What a DataLoader with ``pin_memory=True`` calls: page-locked copies for asynchronous
        host-to-GPU transfer."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped)


def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, Image.Image):  # no transform: uint8 CHW, as torchvision's pil_to_tensor
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return torch.as_tensor(img)


def collate(items: list) -> Batch:
    """Stack good ``(image, label)`` items; ``(None, path)`` items go to ``Batch.skipped``.

    A module-level function so DataLoader workers can pickle it.
    """
    good = [(x, y) for x, y in items if x is not None]
    skipped = [y for x, y in items if x is None]
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
    return Batch(images, labels, skipped)


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


# --------------------------------------------------------------------------- default location


def _search_candidates() -> list[Path]:
    """Places :func:`find_default_cifar10` looks, in order (duplicates removed)."""
    cands: list[Path] = []
    env = os.environ.get("LEANVIT_DATA")
    if env:
        e = Path(env).expanduser()
        # A directory holding the archive counts as the archive itself.
        if (e / _CIFAR_ARCHIVE).is_file():
            cands.append(e / _CIFAR_ARCHIVE)
        cands.append(e)
    cwd = Path.cwd()
    cands += [
        cwd / "data" / _CIFAR_ARCHIVE,
        cwd.parent / "shared" / "data" / _CIFAR_ARCHIVE,
        _REPO_ROOT / "data" / _CIFAR_ARCHIVE,
        _REPO_ROOT.parent / "shared" / "data" / _CIFAR_ARCHIVE,
        cache_dir() / _CIFAR_ARCHIVE,
        cache_dir() / _CIFAR_BATCHES,
        cwd / "data" / _CIFAR_BATCHES,
        Path.home() / "data" / _CIFAR_BATCHES,
        Path.home() / ".cache" / "torchvision" / _CIFAR_BATCHES,
    ]
    seen, out = set(), []
    for c in cands:
        key = os.path.abspath(c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def find_default_cifar10() -> Optional[str]:
    """First existing CIFAR-10 location ($LEANVIT_DATA, ./data, ../shared/data, ~/.cache...)."""
    for c in _search_candidates():
        if c.exists():
            return str(c)
    return None


def describe_search() -> str:
    """Human-readable list of the places :func:`find_default_cifar10` looks."""
    lines = []
    if not os.environ.get("LEANVIT_DATA"):
        lines.append("  - $LEANVIT_DATA (not set)")
    for c in _search_candidates():
        lines.append(f"  - {c}" + ("" if c.exists() else " (missing)"))
    return "\n".join(lines)
