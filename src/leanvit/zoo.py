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
    return sorted(p.stem for p in ZOO_DIR.glob("*.json") if (ZOO_DIR / f"{p.stem}.safetensors").is_file()
                  and "." not in p.stem)


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


def load_model(name: str, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """A reference model by name, offline, with ``pretrained_cfg`` carrying its preprocessing."""
    from .models import ModelError, _timm_create, load_fitting, read_state_dict
    spec_path = ZOO_DIR / f"{name}.json"
    if not spec_path.is_file():
        raise ModelError(f"no reference model {name!r}; shipped: {', '.join(list_models()) or '(none yet)'}")
    spec = json.loads(spec_path.read_text())
    model = _timm_create(spec["timm_model"], **spec.get("kwargs", {}))
    path = checkpoint or str(ZOO_DIR / f"{name}.safetensors")
    load_fitting(model, {k: v.float() for k, v in read_state_dict(path).items()}, path, name)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["pretrained_cfg"].items()}  # JSON lists
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {}, **cfg)
    return model.eval()


def ship_model(model: torch.nn.Module, name: str, timm_model: str) -> dict:
    """Write ``zoo/<name>.safetensors`` (fp16) and ``zoo/<name>.json``; returns the preprocessing."""
    from .train import export_weights
    ZOO_DIR.mkdir(exist_ok=True)
    export_weights(model, ZOO_DIR / f"{name}.safetensors", half=True)
    pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.pretrained_cfg.items()
           if k in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "label_names")}
    spec = dict(timm_model=timm_model, kwargs={"num_classes": model.num_classes}, pretrained_cfg=pre)
    (ZOO_DIR / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    return pre


def timm_architecture(name: str) -> str:
    """The timm model a reference model is built from."""
    return json.loads((ZOO_DIR / f"{name}.json").read_text())["timm_model"]


def publish(run_dir: str, name: str, command: str, data: Optional[str] = None) -> dict:
    """Ship the final weights of a `leanvit train` run as reference model ``name``.

    Writes ``zoo/<name>.safetensors`` (fp16), ``zoo/<name>.json`` (architecture and preprocessing)
    and ``zoo/<name>.md`` (the model card: command, wall time, data, and the top-1 of the *fp16*
    weights measured on the full evaluation split). Returns the measured result.
    """
    import time
    import leanvit
    from .data import eval_transform, load_dataset, make_loader
    from .evaluate import evaluate
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = metrics["config"]
    model = leanvit.create_model(cfg["model"], checkpoint=str(run / "final.safetensors"))
    pre = ship_model(model, name, cfg["model"])

    shipped = load_model(name)  # what users get: the fp16 file, loaded back in fp32
    data = data or cfg["data"]
    ds = load_dataset(data, split=cfg["eval_split"], transform=eval_transform(shipped), num_classes=shipped.num_classes)
    res = evaluate({"dense": leanvit.adapt(shipped, "none")}, make_loader(ds, batch_size=250), desc=f"publish {name}")["dense"]
    hist = metrics["history"]
    size_mb = (ZOO_DIR / f"{name}.safetensors").stat().st_size / 2**20
    card = f"""# {name}

A 12-block ViT for CIFAR-10 at 32x32 (`{cfg['model']}` in `leanvit/archs.py`): conv stem to an 8x8
grid, CLS + 64 patch tokens = 65 tokens, timm pre-norm blocks. leanvit's reference model for
comparing token-reduction methods (decision layers 3, 6, 9 as in the papers).

- **Top-1 on CIFAR-10 (JPEG) test, {res.n_images} images: {res.top1:.2f}%** (these fp16 weights loaded in fp32;
  measured {time.strftime('%Y-%m-%d')} by `leanvit.zoo.publish`, {res.skipped} images skipped),
  {res.gmacs:.4f} GMACs/image.
- Weights: `{name}.safetensors`, fp16, {size_mb:.1f} MB. Preprocessing in `{name}.json`
  (mean {pre['mean']}, std {pre['std']}, input {pre['input_size']}).
- Trained from scratch on the 50,000 CIFAR-10 (JPEG) training images from `../shared/data/`,
  {metrics['epochs_done']:.0f} epochs ({metrics['steps']} steps of a global batch of {cfg['batch_size']}),
  {metrics['world_size']} data-parallel CPU processes, wall time {hist[-1]['elapsed_s'] / 60:.0f} min on a
  2-core x86_64 VM (no GPU).
- Command (`benchmarks/train_reference.sh`):

```
{command}
```

Top-1 (fp32 weights, during training) per epoch:

| epoch | train loss | top-1 % | elapsed min |
|---:|---:|---:|---:|
""" + "\n".join(f"| {h['epoch']} | {h['train_loss']:.3f} | {h['top1']:.2f} | {h['elapsed_s'] / 60:.1f} |" for h in hist) + "\n"
    (ZOO_DIR / f"{name}.md").write_text(card)
    return dict(top1=res.top1, gmacs=res.gmacs, n_images=res.n_images, size_mb=size_mb)
