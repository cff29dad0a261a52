"""Building models by name: leanvit's reference models and every timm ViT, from a checkpoint or
pretrained weights. The one home of model loading (:mod:`leanvit.zoo` only says where the shipped
files are)."""
from __future__ import annotations

import difflib
import json
import os
import socket
import zlib
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import timm

from .zoo import ZOO_DIR

HUB_HOST = "huggingface.co"


class ModelError(ValueError):
    """Unknown model name, unreadable checkpoint or unavailable pretrained weights."""


def list_models() -> List[str]:
    """leanvit's own reference models (trained and shipped with the package) whose weights are present."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.stem for p in ZOO_DIR.glob("*.json") if (ZOO_DIR / f"{p.stem}.safetensors").is_file()
                  and "." not in p.stem)


def load_model(name: str, checkpoint: Optional[str] = None) -> nn.Module:
    """A reference model by name, offline, with ``pretrained_cfg`` carrying its preprocessing."""
    spec_path = ZOO_DIR / f"{name}.json"
    if not spec_path.is_file():
        raise ModelError(f"no reference model {name!r}; shipped: {', '.join(list_models()) or '(none yet)'}")
    spec = json.loads(spec_path.read_text())
    model = _timm_create(spec["timm_model"], **spec.get("kwargs", {}))
    path = checkpoint or str(ZOO_DIR / f"{name}.safetensors")
    load_fitting(model, read_state_dict(path), path, name)  # fp16 weights into fp32 parameters: exact
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["pretrained_cfg"].items()}  # JSON lists
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {}, **cfg, leanvit_model=name)
    return model.eval()


def read_state_dict(path: str) -> dict:
    """A state dict from a safetensors file or a torch checkpoint (``model``/``state_dict`` keys ok)."""
    p = Path(path)
    if p.is_dir():
        raise ModelError(f"checkpoint {path} is a directory; pass a weights file (.safetensors or torch)")
    if not p.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, wrong format, or a pickle that would run code (refused)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"cannot read checkpoint {path} ({type(e).__name__}: {first}); leanvit reads "
                         "safetensors, or torch files holding only tensors (weights_only=True)") from None
    for key in ("model_ema", "model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_fitting(model: nn.Module, sd: dict, path: str, name: str) -> None:
    """Load ``sd`` into ``model`` exactly; weights of another architecture are one ModelError line
    (what is missing, left over or of another shape), not torch's dump of every key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]

    def some(keys):
        return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

    problems = [f"{what} {some(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)) if keys]
    if problems:
        raise ModelError(f"checkpoint {path} does not fit {name}: {'; '.join(problems)}; pass weights "
                         f"saved from {name} (leanvit train writes OUT/final.safetensors)")
    check_weights(sd, own, f"checkpoint {path}")
    model.load_state_dict(sd)


def check_weights(sd: dict, own: dict, what: str) -> None:
    """Weights where the module has floating-point ones must be floating point and finite: an int8
    or bool tensor would be cast silently and NaN weights give NaN logits. ``what`` names the file."""
    for key, value in sd.items():
        mine = own.get(key)
        if mine is None or not mine.is_floating_point():
            continue
        if not value.is_floating_point():
            raise ModelError(f"{what}: tensor {key} is {str(value.dtype).removeprefix('torch.')}, not floating "
                             "point; pass the weights as they were trained (float32, float16 or bfloat16)")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ModelError(f"{what}: tensor {key} has {bad} NaN or infinite value(s); these weights are broken")


# two sketches are of the same weights when every tensor's numbers agree within this fraction of its
# norm: a cast to float16 or bfloat16 moves them by under 0.4%, another training by far more
SKETCH_TOLERANCE = 0.02


def weights_sketch(model: nn.Module) -> dict:
    """What identifies a model's weights up to rounding: for every floating-point tensor (by name)
    its shape, its L2 norm and its projections on two fixed random +-1 vectors. Unlike a hash of the
    bytes it survives casts (fp32, fp16, bf16) of the same weights; other weights change it."""
    sketch = {}
    for key, value in sorted(model.state_dict().items()):
        if not value.is_floating_point():
            continue
        w = value.detach().to("cpu", torch.float32).flatten()
        width = min(w.numel(), 4096)  # the vectors repeat every 4096 numbers: the tensor folded, then projected
        folded = torch.nn.functional.pad(w, (0, -w.numel() % max(width, 1))).reshape(-1, max(width, 1)).sum(0)
        signs = torch.randint(0, 2, (2, folded.numel()), generator=torch.Generator().manual_seed(
            zlib.crc32(key.encode())), dtype=torch.float32) * 2 - 1
        numbers = [float(torch.linalg.vector_norm(w))] + (signs @ folded).tolist()
        sketch[key] = [list(value.shape)] + [float(f"{x:.6g}") for x in numbers]
    return sketch


def sketch_difference(trained: dict, current: dict) -> Optional[str]:
    """None when two :func:`weights_sketch` are of the same weights, else what differs."""
    if not isinstance(trained, dict) or sorted(trained) != sorted(current):
        return "other tensors"
    for key, mine in current.items():
        theirs = trained[key]
        if not isinstance(theirs, list) or len(theirs) != len(mine) or theirs[0] != mine[0]:
            return f"tensor {key} of another shape"
        scale = max(abs(mine[1]), 1e-12)
        try:
            if any(abs(float(a) - b) > SKETCH_TOLERANCE * scale for a, b in zip(theirs[1:], mine[1:])):
                return f"other values in tensor {key}"
        except (TypeError, ValueError):
            return f"an unreadable record of tensor {key}"
    return None


def model_name(model: nn.Module) -> str:
    """A model's name for messages: the reference model's, else timm's architecture."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("leanvit_model") or cfg.get("architecture") or type(model).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(HUB_HOST, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def create_model(name: str, *, checkpoint: Optional[str] = None, pretrained: bool = False,
                 num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """A model in eval mode: a leanvit reference model or a timm model, with its weights.

    ``checkpoint``: a local safetensors / torch file (its head decides ``num_classes`` unless
    given). ``pretrained``: timm's pretrained weights (needs the network or a filled HF cache).
    """
    if checkpoint and pretrained:
        raise ModelError("pass either --checkpoint or --pretrained, not both")
    if name in list_models():
        if pretrained:
            raise ModelError(f"{name} is a leanvit reference model: it loads its shipped weights, "
                             "--pretrained does not apply")
        model = load_model(name, checkpoint=checkpoint)
        if num_classes is not None and num_classes != model.num_classes:  # its head is what was shipped
            raise ModelError(f"{name} is a leanvit reference model with {model.num_classes} classes; "
                             f"--num-classes {num_classes} does not apply (fine-tune a timm model for another "
                             "number of classes)")
        return model.eval()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model {name!r}{hint} (see leanvit.list_models() and timm.list_models())")
    if checkpoint:
        sd = read_state_dict(checkpoint)
        if num_classes is None and "head.weight" in sd:
            num_classes = sd["head.weight"].shape[0]
        model = _timm_create(name, num_classes=num_classes, **kwargs)
        load_fitting(model, sd, checkpoint, name)
        return model.eval()
    if pretrained:
        if not _hub_reachable():
            raise ModelError(
                f"cannot download pretrained weights for {name}: the model hub is not reachable "
                "(no network). Download the weights where you have a network, then pass the file "
                "with --checkpoint PATH (python: create_model(name, checkpoint=PATH)).")
        try:
            return _timm_create(name, pretrained=True, num_classes=num_classes, **kwargs).eval()
        except Exception as e:
            raise ModelError(f"could not load pretrained weights for {name}: {e}. "
                             "Pass a local file with --checkpoint PATH instead.") from None
    return _timm_create(name, num_classes=num_classes, **kwargs).eval()


def _timm_create(name, num_classes=None, **kwargs):
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, **kwargs)
