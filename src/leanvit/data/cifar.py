"""CIFAR-10: torchvision's pickled batches (read by a restricted unpickler that runs no code), the
download into ``~/.cache/leanvit``, the sample embedded in the package, and the default search for
a local copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from .readers import SPLIT_ALIASES, DataError, LabeledImages, PathLike, balanced_subset, label_map

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# Where this file lives in a source checkout: src/leanvit/data/cifar.py -> repo root.
_REPO_ROOT = Path(__file__).resolve().parents[3]
_CIFAR_ARCHIVE = "cifar10-jpeg.tar.gz"
_CIFAR_BATCHES = "cifar-10-batches-py"
# The demo's 2,000-image class-balanced CIFAR-10 test subset, shipped as package data
# (assets/README.md says what it is; tools/make_cifar10_sample.py builds it).
EMBEDDED_CIFAR10 = Path(__file__).resolve().parent.parent / "assets" / "cifar10-test-2000.tar.gz"
SAMPLE_NAME, DOWNLOAD_NAME = "cifar10-sample", "cifar10"


def cifar_batches_dir(d: Path) -> Optional[Path]:
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


def load_cifar_batches(d: Path, split: str, num_classes, limit, seed, transform) -> LabeledImages:
    """torchvision's CIFAR-10 python format: 'train' -> data_batch_1..5, 'test'/'val' -> test_batch."""
    if split == "train":
        files = sorted(f for f in d.glob("data_batch_[0-9]*") if f.is_file())  # a FIFO would block
    elif split in SPLIT_ALIASES:
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
    bad = next((x for x in labels if not 0 <= x < len(classes)), None)
    if bad is not None:
        raise DataError(f"{d}: label {bad} out of range for {len(classes)} classes (0..{len(classes) - 1})")
    label_of = label_map(classes, num_classes, str(d))
    sel = balanced_subset(labels, limit, seed)
    array = np.concatenate(arrays)[sel]
    return LabeledImages(
        paths=[paths[i] for i in sel], targets=[label_of[labels[i]] for i in sel],
        classes=classes, root=str(d), transform=transform, array=np.ascontiguousarray(array),
        split=split,
    )


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
