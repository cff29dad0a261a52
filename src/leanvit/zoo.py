"""Where the reference models leanvit ships are (trained on this project's machines, see each model
card): an index of files only; :mod:`leanvit.models` loads them, and ``tools/publish.py`` of a
source checkout writes them.

Each entry is ``zoo/<name>.safetensors`` (fp16 weights) next to ``zoo/<name>.json`` (the timm
architecture arguments and the preprocessing config), and ``zoo/<name>.md`` (the model card).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

ZOO_DIR = Path(__file__).parent / "zoo"


def method_weights_path(spec: str, method: str) -> str:
    """A learned method's weights: a file path, or a reference model's name, for the weights
    shipped for that model as ``zoo/<model>.<method>.safetensors``."""
    shipped = ZOO_DIR / f"{spec}.{method}.safetensors"
    if Path(spec).is_file() or not shipped.is_file():
        return spec
    return str(shipped)


def list_method_weights(method: str) -> List[str]:
    """Reference models for which weights of ``method`` are shipped."""
    suffix = f".{method}.safetensors"
    return sorted(p.name[:-len(suffix)] for p in ZOO_DIR.glob(f"*{suffix}")) if ZOO_DIR.is_dir() else []


def timm_architecture(name: str) -> str:
    """The timm model a reference model is built from."""
    return json.loads((ZOO_DIR / f"{name}.json").read_text())["timm_model"]
