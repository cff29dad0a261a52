"""Ship the PRANCE meta-network and one selector for the reference model, with a model card.

    python benchmarks/publish_prance.py --selector runs/prance-sel/prune-merge/budget-0.5 \
        --strategy prune-merge

Writes src/leanvit/zoo/cifar10_vit12_w128_prance.{safetensors (fp16), json, md} and
cifar10_vit12_w128_prance.prance.safetensors (the selector, fp32), then measures what users get
(the shipped files, loaded back) on the 10,000 CIFAR-10 test images and puts it in the card.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import leanvit
from leanvit.data import eval_transform, load_dataset, make_loader
from leanvit.evaluate import evaluate
from leanvit.publish import ship_model
from leanvit.zoo import ZOO_DIR, timm_architecture

NAME = "cifar10_vit12_w128_prance"
BASE = "cifar10_vit12_w128"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta", default="runs/prance-supernet")
    ap.add_argument("--selector", required=True, help="a train-selector output directory")
    ap.add_argument("--strategy", required=True)
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    args = ap.parse_args()
    torch.set_num_threads(2)
    meta_run, sel_dir = Path(args.meta), Path(args.selector)
    model = leanvit.create_model(BASE, checkpoint=str(meta_run / "final.safetensors"))
    ship_model(model, NAME, timm_architecture(BASE))
    shutil.copyfile(sel_dir / "selector.safetensors", ZOO_DIR / f"{NAME}.prance.safetensors")

    shipped = leanvit.load_model(NAME)
    ds = load_dataset(args.data, split="test", transform=eval_transform(shipped), num_classes=shipped.num_classes)
    runners = {"largest (dense)": leanvit.adapt(shipped, "none"),
               "middle": leanvit.adapt(shipped, "prance", subnet="middle"),
               "smallest": leanvit.adapt(shipped, "prance", subnet="smallest"),
               "selector": leanvit.adapt(shipped, "prance", strategy=args.strategy, weights=NAME)}
    res = evaluate(runners, make_loader(ds, batch_size=250), desc=f"publish {NAME}")
    meta = json.loads((meta_run / "metrics.json").read_text())
    sel = json.loads((sel_dir / "metrics.json").read_text())
    budget = sel["config"]["budget"]
    rows = "\n".join(f"| {k} | {r.top1:.2f} | {r.gmacs:.4f} |" for k, r in res.items())
    hist = "\n".join(f"| {h['epoch']} | {h['top1_smallest']:.2f} | {h['top1_middle']:.2f} | {h['top1']:.2f} |"
                     for h in meta["history"])
    card = f"""# {NAME}

PRANCE for leanvit's reference model `{BASE}`: the channel-elastic meta-network (fp16,
`{NAME}.safetensors`) and a per-image selector (`{NAME}.prance.safetensors`, fp32, strategy
`{args.strategy}`, trained for a GMACs budget of {budget} of dense).

```python
import leanvit
model = leanvit.load_model("{NAME}")
fast = leanvit.adapt(model, "prance", strategy="{args.strategy}", weights="{NAME}")
```

Measured {time.strftime('%Y-%m-%d')} by `benchmarks/publish_prance.py` on the 10,000 CIFAR-10 (JPEG)
test images with these shipped files ({res['selector'].skipped} images skipped):

| configuration | top-1 % | GMACs/image |
|---|---:|---:|
{rows}

The selector's GMACs include its own MLP. Sub-networks: largest = all 4 heads and 512 MLP
neurons per block; middle = 2 heads, 256 neurons and smallest = 1 head, 128 neurons in blocks 3-11
(the first stage always runs at full width).

## How it was trained (2-core x86_64 VM, no GPU)

1. Meta-network, `bash benchmarks/prance_supernet.sh` (from the shipped `{BASE}`, heads and
   neurons reordered by importance, {meta['epochs_done']:.0f} epochs of weight-sharing fine-tuning, 2 torchrun
   processes, {meta['history'][-1]['elapsed_s'] / 60:.0f} min). Top-1 on the test set of the sub-networks (epoch 0 =
   after reordering, before this training):

| epoch | smallest | middle | largest |
|---:|---:|---:|---:|
{hist}

2. Selector, `bash benchmarks/prance_selectors.sh` (strategy `{args.strategy}`, budget {budget}, the
   cost weight PI-controlled during training; {sel['steps']} PPO batches, {sel['history'][-1]['elapsed_s'] / 60:.0f} min): GMACs ratio
   {sel['gmacs_ratio']:.3f} on the 1,000 training images it was tuned on (within 5% of the budget:
   {sel['budget_met']}), final cost weight {sel['cost_weight']:.4g}.
"""
    (ZOO_DIR / f"{NAME}.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
