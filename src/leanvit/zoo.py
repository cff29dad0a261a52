"""The reference models leanvit ships (trained on this project's machines, see each model card).

Each entry is ``zoo/<name>.safetensors`` (fp16 weights) next to ``zoo/<name>.json`` (the timm
architecture arguments and the preprocessing config), and ``zoo/<name>.md`` (the model card).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

ZOO_DIR = Path(__file__).parent / "zoo"


def list_models() -> List[str]:
    """Names of the shipped reference models whose weights are present."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.stem for p in ZOO_DIR.glob("*.json") if (ZOO_DIR / f"{p.stem}.safetensors").is_file())


def load_model(name: str, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """A reference model by name, offline, with ``pretrained_cfg`` carrying its preprocessing."""
    from .models import ModelError, _timm_create, read_state_dict
    spec_path = ZOO_DIR / f"{name}.json"
    if not spec_path.is_file():
        raise ModelError(f"no reference model {name!r}; shipped: {', '.join(list_models()) or '(none yet)'}")
    spec = json.loads(spec_path.read_text())
    model = _timm_create(spec["timm_model"], **spec.get("kwargs", {}))
    sd = read_state_dict(checkpoint or str(ZOO_DIR / f"{name}.safetensors"))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {}, **spec["pretrained_cfg"])
    return model.eval()
