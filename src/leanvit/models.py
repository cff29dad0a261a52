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
        # a name that resolves is not a connection (proxies, firewalls): a download could hang
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def create_model(name: str, *, checkpoint: Optional[str] = None, pretrained: bool = False,
                 num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """A model in eval mode: a leanvit reference model or a timm model, with its weights; or
    ``hf:<directory or hub name>`` / ``open_clip:<architecture>`` (with ``checkpoint``): that
    model converted to the equivalent timm VisionTransformer (:mod:`leanvit.convert`).

    ``checkpoint``: a local safetensors / torch file (its head decides ``num_classes`` unless
    given). ``pretrained``: timm's pretrained weights (needs the network or a filled HF cache).
    """
    if checkpoint and pretrained:
        raise ModelError("pass either --checkpoint or --pretrained, not both")
    if name.startswith(("hf:", "open_clip:")):
        if num_classes is not None or kwargs:
            raise ModelError(f"{name}: the model's own configuration decides its classes and layout; "
                             "--num-classes (and timm options) do not apply")
        return _create_hf(name[3:]) if name.startswith("hf:") else _create_open_clip(name[10:], checkpoint)
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


# --- transformers and open_clip models, as the equivalent timm VisionTransformer ---------------------
# a checkpoint's architecture -> the vision model leanvit loads from it (a full CLIP / SigLIP
# checkpoint holds the vision tower; its config carries the vision config)
HF_LOAD_AS = {"CLIPModel": "CLIPVisionModelWithProjection", "SiglipModel": "SiglipVisionModel"}
HF_MODEL_TYPES = {"vit": "ViTModel", "deit": "DeiTModel", "clip_vision_model": "CLIPVisionModel",
                  "clip": "CLIPVisionModelWithProjection", "siglip_vision_model": "SiglipVisionModel",
                  "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model",
                  "dinov2_with_registers": "Dinov2WithRegistersModel"}


def _require(package: str, name: str):
    import importlib
    from .convert import INSTALL_HINT
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ModelError(f"{name} needs {package}: {INSTALL_HINT}") from None


def _create_hf(ref: str) -> nn.Module:
    """``hf:<ref>``: a local directory (save_pretrained) or a hub name (its cached copy, or a
    download when the hub is reachable), safetensors weights only, no remote code."""
    transformers = _require("transformers", f"hf:{ref}")
    from .convert import HF_CLASSES, ConversionError, convert
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"hf:{ref}: the directory has no config.json (save it with model.save_pretrained)")
        source, online = str(local), False
    elif ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a path, not a hub name (org/name)
        raise ModelError(f"hf:{ref}: no such directory")
    else:
        source, online = ref, _hub_reachable()
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=not online)
    except (OSError, ValueError) as e:
        if not online and not local.is_dir():
            raise ModelError(f"hf:{ref}: no local copy in the Hugging Face cache and the hub is not reachable "
                             "(offline); download it where there is a network and pass hf:<directory>") from None
        raise ModelError(f"hf:{ref}: cannot read its config ({str(e).splitlines()[0][:200]})") from None
    arch = next(iter(getattr(config, "architectures", None) or []), None)
    cls_name = HF_LOAD_AS.get(arch, arch) if arch in HF_CLASSES or arch in HF_LOAD_AS else \
        HF_MODEL_TYPES.get(config.model_type)
    if cls_name is None:
        raise ModelError(f"hf:{ref} is a {arch or config.model_type} model; leanvit converts "
                         f"{', '.join(HF_CLASSES)}")
    try:
        model = getattr(transformers, cls_name).from_pretrained(
            source, local_files_only=not online, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelError(f"hf:{ref}: cannot load {cls_name} ({str(e).splitlines()[0][:200]}); leanvit loads "
                         "safetensors weights only (no pickled .bin files)") from None
    processor = _hf_processor(source, online)
    try:  # at the processor's crop size (DINOv2's position embeddings interpolated to it, as it does)
        timm_model = convert(model.eval(), processor["input_size"][1:] if "input_size" in processor else None).model
    except ConversionError as e:
        raise ModelError(f"hf:{ref}: {e}") from None
    timm_model.pretrained_cfg = dict(processor, input_size=(3, *timm_model.patch_embed.img_size))
    return timm_model.eval()


def _hf_processor(source: str, online: bool) -> dict:
    """timm's preprocessing fields from the checkpoint's preprocessor_config.json (JSON only):
    size, crop, mean, std, resampling. Empty without the file."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download
            path = Path(hf_hub_download(source, "preprocessor_config.json", local_files_only=not online))
        except Exception:  # no processor file: timm's defaults, as for any model without one
            return {}
    p = json.loads(path.read_text())

    def side(v):
        return v if isinstance(v, int) else v.get("shortest_edge") or (v.get("height"), v.get("width"))

    size = side(p.get("size", 224))
    crop = side(p.get("crop_size", size)) if p.get("do_center_crop") else size
    crop_hw = crop if isinstance(crop, tuple) else (crop, crop)
    cfg = {"input_size": (3, *crop_hw), "interpolation": {0: "nearest", 2: "bilinear"}.get(p.get("resample"), "bicubic")}
    if isinstance(size, int) and p.get("do_center_crop"):
        cfg["crop_pct"] = crop_hw[0] / size
    else:  # resized to the exact height and width
        cfg.update(crop_pct=1.0, crop_mode="squash")
    for k in ("mean", "std"):
        if p.get(f"image_{k}") is not None:
            cfg[k] = tuple(p[f"image_{k}"])
    return cfg


def _create_open_clip(arch: str, checkpoint: Optional[str]) -> nn.Module:
    """``open_clip:<arch>``: open_clip's architecture, its image tower's weights from
    ``checkpoint`` (a full CLIP state dict or the tower's), as the equivalent timm model."""
    open_clip = _require("open_clip", f"open_clip:{arch}")
    from .convert import ConversionError, convert
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.6)
        raise ModelError(f"unknown open_clip architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    model = open_clip.create_model(arch, pretrained=None)
    if checkpoint:
        sd = read_state_dict(checkpoint)
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        load_fitting(model.visual, sd, checkpoint, f"open_clip {arch}'s image tower")
    try:
        timm_model = convert(model.eval()).model
    except ConversionError as e:
        raise ModelError(f"open_clip:{arch}: {e}") from None
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    timm_model.pretrained_cfg = {
        "input_size": (3, *timm_model.patch_embed.img_size), "crop_pct": 1.0,
        "interpolation": pre.get("interpolation", "bicubic"),
        "mean": tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))}
    return timm_model.eval()
