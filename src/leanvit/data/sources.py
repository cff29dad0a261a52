"""Which reader a ``--data`` path or name goes to: :func:`load_dataset` and :func:`resolve_data`."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Callable, Optional

from .cifar import (DOWNLOAD_NAME, EMBEDDED_CIFAR10, SAMPLE_NAME, cifar_batches_dir, describe_search,
                    download_cifar10, find_default_cifar10, load_cifar_batches)
from .cluttered import cluttered_from, cluttered_source, is_cluttered_spec
from .readers import (ACCEPTED_LAYOUTS, ARCHIVE_ERRORS, ARCHIVE_SUFFIXES, DataError, LabeledImages, PathLike,
                      balanced_subset, check_classes, load_folder, load_tar)

DATA_HELP = ("an ImageFolder dir, a tar of [<split>/]<class>/<img>, a cifar-10-batches-py dir, or a name: "
             "cifar10 (the full CIFAR-10, downloaded into ~/.cache/leanvit) or cifar10-sample (2,000 CIFAR-10 "
             "test images shipped with leanvit), or cluttered-cifar10 / cluttered-cifar10-sample / cluttered:<one of these> "
             "(its objects pasted at random scales and places on a 64x64 textured canvas, with their boxes); "
             "default for training/sweep: CIFAR-10 from the standard locations")


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
    are resolved by :func:`resolve_data`; ``cluttered-cifar10``, ``cluttered-cifar10-sample`` and
    ``cluttered:<spec>`` compose cluttered images from that CIFAR-10 (:mod:`leanvit.data.cluttered`). Labels are sorted class-folder
    indices; if ``num_classes`` differs from the number of classes, ImageNet wnid
    folders are mapped to ImageNet-1k indices for a 1000-class model, anything else
    raises :class:`DataError`. ``limit`` keeps a seeded, class-balanced subset.
    For split ``'val'`` a ``test`` folder is accepted (and vice versa). ``classes``: the labels
    the model knows (:func:`model_label_names`); other class names are a :class:`DataError`.
    """
    if is_cluttered_spec(path):
        source = _load_any(resolve_data(cluttered_source(path)), split, num_classes, None, seed, None)
        ds = cluttered_from(source, split, transform=transform)
        ds = ds if limit is None else ds.subset(balanced_subset(ds.targets, limit, seed), transform)
    else:
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
        except ARCHIVE_ERRORS:  # a damaged archive: load_tar says what is wrong with it
            is_tar = True
        if not is_tar and not p.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"{p} is a file but not a tar archive; expected {ACCEPTED_LAYOUTS}")
        return load_tar(p, *args)
    if p.is_dir():
        batches = cifar_batches_dir(p)
        if batches is not None:
            return load_cifar_batches(batches, *args)
        return load_folder(p, *args)
    raise DataError(f"{p} is neither a file nor a directory; expected {ACCEPTED_LAYOUTS}")


def resolve_data(path: Optional[PathLike]) -> Path:
    """The path that ``path`` names: itself if it exists; ``None`` -> :func:`find_default_cifar10`;
    ``cifar10-sample`` -> the embedded sample; ``cifar10`` -> the full set, downloaded if missing."""
    if is_cluttered_spec(path):
        return resolve_data(cluttered_source(path))
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


