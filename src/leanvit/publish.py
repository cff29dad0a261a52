"""Shipping reference models: a run's weights written into the zoo with their model card, the
top-1 in the card measured on the shipped files as users load them."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from .data import eval_transform, load_dataset, make_loader
from .evaluate import evaluate
from .models import create_model, load_model
from .runtime import adapt
from .training import export_weights
from .zoo import ZOO_DIR


def ship_model(model: torch.nn.Module, name: str, timm_model: str) -> dict:
    """Write ``zoo/<name>.safetensors`` (fp16) and ``zoo/<name>.json``; returns the preprocessing."""
    ZOO_DIR.mkdir(exist_ok=True)
    export_weights(model, ZOO_DIR / f"{name}.safetensors", half=True)
    pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.pretrained_cfg.items()
           if k in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "label_names")}
    spec = dict(timm_model=timm_model, kwargs={"num_classes": model.num_classes}, pretrained_cfg=pre)
    (ZOO_DIR / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    return pre


def publish(run_dir: str, name: str, command: str, data: Optional[str] = None) -> dict:
    """Ship the final weights of a `leanvit train` run as reference model ``name``.

    Writes ``zoo/<name>.safetensors`` (fp16), ``zoo/<name>.json`` (architecture and preprocessing)
    and ``zoo/<name>.md`` (the model card: command, wall time, data, and the top-1 of the *fp16*
    weights measured on the full evaluation split). Returns the measured result.
    """
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = metrics["config"]
    model = create_model(cfg["model"], checkpoint=str(run / "final.safetensors"))
    pre = ship_model(model, name, cfg["model"])

    shipped = load_model(name)  # what users get: the fp16 file, loaded back in fp32
    data = data or cfg["data"]
    ds = load_dataset(data, split=cfg["eval_split"], transform=eval_transform(shipped), num_classes=shipped.num_classes)
    res = evaluate({"dense": adapt(shipped, "none")}, make_loader(ds, batch_size=250), desc=f"publish {name}")["dense"]
    hist = metrics["history"]
    size_mb = (ZOO_DIR / f"{name}.safetensors").stat().st_size / 2**20
    card = f"""# {name}

A 12-block ViT for CIFAR-10 at 32x32 (`{cfg['model']}` in `leanvit/archs.py`): conv stem to an 8x8
grid, CLS + 64 patch tokens = 65 tokens, timm pre-norm blocks. leanvit's reference model for
comparing token-reduction methods (decision layers 3, 6, 9 as in the papers).

- **Top-1 on CIFAR-10 (JPEG) test, {res.n_images} images: {res.top1:.2f}%** (these fp16 weights loaded in fp32;
  measured {time.strftime('%Y-%m-%d')} by `leanvit.publish`, {res.skipped} images skipped),
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
