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
evaluation can report exactly what it did not score. Entries that are not regular image files of
their class (FIFOs, sockets, devices, links into another class or out of the data folder) are
never opened: ``LabeledImages.skipped_files`` lists them.
"""

from .cifar import (CIFAR10_CLASSES, DOWNLOAD_NAME, EMBEDDED_CIFAR10, SAMPLE_NAME, cache_dir, describe_search,
                    download_cifar10, find_default_cifar10)
from .loader import Batch, batch_shard, collate, eval_transform, make_loader, model_label_names
from .readers import (ACCEPTED_LAYOUTS, IMG_EXTENSIONS, DataError, LabeledImages, PathLike, balanced_subset,
                      check_classes)
from .sources import DATA_HELP, load_dataset, resolve_data

__all__ = [
    "ACCEPTED_LAYOUTS",
    "CIFAR10_CLASSES",
    "DATA_HELP",
    "DOWNLOAD_NAME",
    "EMBEDDED_CIFAR10",
    "IMG_EXTENSIONS",
    "SAMPLE_NAME",
    "Batch",
    "DataError",
    "LabeledImages",
    "PathLike",
    "balanced_subset",
    "batch_shard",
    "cache_dir",
    "check_classes",
    "collate",
    "describe_search",
    "download_cifar10",
    "eval_transform",
    "find_default_cifar10",
    "load_dataset",
    "make_loader",
    "model_label_names",
    "resolve_data",
]
