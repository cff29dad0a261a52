"""What a result was computed from, written into every result JSON so that a number can be traced
to the exact weights, data and code behind it (and a question about it settled from the file)."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from importlib import metadata
from typing import Mapping, Optional


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path) -> Optional[str]:
    """sha256 of a file (cached per path and modification time), None for anything else."""
    p = Path(str(path)) if path is not None else None
    return _sha256(str(p.resolve()), p.stat().st_mtime_ns) if p is not None and p.is_file() else None


@functools.lru_cache(maxsize=1)
def leanvit_commit() -> Optional[str]:
    """The git commit of the leanvit source in use (``+dirty`` with uncommitted changes), or None
    for an installed package without its repository."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def model_weights(model: str, checkpoint: Optional[str] = None, pretrained: bool = False) -> dict:
    """Which weights a model ran with: a checkpoint file, a shipped reference model, timm's
    pretrained weights, or random ones (tests, speed)."""
    from .models import list_models
    from .zoo import ZOO_DIR
    if checkpoint:
        path, source = str(checkpoint), "checkpoint"
    elif model in list_models():
        path, source = str(ZOO_DIR / f"{model}.safetensors"), "shipped"
    else:
        path, source = None, "timm pretrained" if pretrained else "random"
    return dict(model=model, weights=source, checkpoint=path, checkpoint_sha256=file_sha256(path))


def method_weights(method: str, options: Mapping) -> Optional[dict]:
    """The learned weights a method configuration loads (``weights=`` option), with their sha256."""
    from .zoo import method_weights_path
    spec = options.get("weights")
    if not spec:
        return None
    path = method_weights_path(str(spec), method)
    return dict(weights=str(spec), path=path, sha256=file_sha256(path))


def provenance(*, model: str, checkpoint: Optional[str] = None, pretrained: bool = False, data=None,
               split: Optional[str] = None, limit: Optional[int] = None, seed: Optional[int] = None) -> dict:
    """The record every result JSON carries (under ``provenance``)."""
    return dict(model_weights(model, checkpoint, pretrained), data=None if data is None else str(data),
                data_sha256=file_sha256(data), split=split, limit=limit, seed=seed,
                leanvit_version=_version(), leanvit_commit=leanvit_commit())


def _version() -> Optional[str]:
    try:
        return metadata.version("leanvit")
    except metadata.PackageNotFoundError:
        return None


def write_json(path, payload: dict) -> None:
    """A result JSON (its folder made if missing), written atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = _non_finite(payload)
    if bad:  # bare NaN is not JSON: no reader of the file would accept it
        raise ValueError(f"not writing {path}: the result's {bad} is not a finite number (NaN or infinite "
                         "logits: check the weights and the images)")
    text = json.dumps(payload, indent=2, default=str, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"could not write {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind


def _non_finite(value, where: str = "") -> Optional[str]:
    """The key path of the first NaN or infinite number in a JSON-ready value, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None
