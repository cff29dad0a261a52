"""The positive controls on a cluttered-CIFAR-10 model, measured on held-out TRAINING images.

For each checkpoint (e.g. the per-epoch snapshots of `train_reference.sh cluttered`): dense top-1; EViT
(fused, and without fusion) and random tokens at each keep rate, with KL to dense, each EViT
against its random floor at its own per-image counts (paired 95% intervals); object recall and
background kept at every decision; where the CLS token's attention falls (share on the object's
area, against the area itself) before each decision layer.

Held-out images: the 1,000 training images `leanvit train --eval-split holdout --limit-eval 1000`
keeps out (seed 0), composed with placements seeded by index. Never the test split: the testbed's
design is chosen on these.

    PYTHONPATH=src python benchmarks/cluttered_controls.py runs/cluttered-w128/snapshots/epoch*.safetensors \
        --out benchmarks/results/cluttered/controls.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from leanvit import adapt
from leanvit.data import eval_transform, make_loader
from leanvit.evaluate import evaluate
from leanvit.methods.base import Reduction
from leanvit.models import create_model
from leanvit.objects import boxes_as_seen, object_report, patch_object_weights
from leanvit.training import holdout_split


class AttentionProbe(Reduction):
    """Keeps every token; records the CLS attention (mean over heads) at each decision layer."""

    name = "probe"

    def __init__(self, layers=(3, 6, 9)):
        self.layers, self.seen = tuple(layers), {}

    def decision_layers(self):
        return self.layers

    def reduce(self, layer, state, attn):
        self.seen.setdefault(layer, []).append(attn.cls_attn_mean[:, state.n_prefix:].float().cpu())
        return state


def held_out(model, data: str, n: int):
    cfg = SimpleNamespace(data=data, train_split="train", limit_train=None, limit_eval=n, seed=0)
    return holdout_split(cfg, model.num_classes, None, eval_transform(model))[1]


def cls_attention_on_object(model, loader) -> dict:
    """Per decision layer, the share of the CLS token's attention that falls on the object's area
    (the object's share of the image's area beside it: what attention blind to the object gives)."""
    probe = adapt(model, AttentionProbe())
    shares, area = {}, []
    for batch in loader:
        weights = patch_object_weights(boxes_as_seen(batch.boxes, model), int(round(model.patch_embed.num_patches ** 0.5)))
        area.append(weights.mean(1))
        probe.method.seen = {}
        with torch.inference_mode():
            probe(batch.images)
        for layer, (attn,) in probe.method.seen.items():
            shares.setdefault(str(layer), []).append((attn * weights).sum(1) / attn.sum(1))
    return dict(object_area_share=float(torch.cat(area).mean()),
                cls_attention_on_object={k: float(torch.cat(v).mean()) for k, v in shares.items()})


def check(model_name: str, checkpoint: str, data: str, n: int, keeps) -> dict:
    model = create_model(model_name, checkpoint=checkpoint).eval()
    loader = make_loader(held_out(model, data, n), batch_size=100, num_workers=0)
    runners = {"dense": adapt(model, "none")}
    for keep in keeps:
        runners[f"evit {keep}"] = adapt(model, "evit", keep_rate=keep)
        runners[f"evit nofuse {keep}"] = adapt(model, "evit", keep_rate=keep, fuse=False)
        runners[f"random {keep}"] = adapt(model, "random", keep_rate=keep, independent=False)
    controls = [k for k in runners if k.startswith("evit")]
    results = evaluate(runners, loader, desc=Path(checkpoint).stem, controls=controls)
    table = {k: {f: v for f, v in r.to_dict().items() if f not in ("skipped_paths", "extra")}
             for k, r in results.items()}
    objects = object_report(runners, loader)
    return dict(checkpoint=checkpoint, held_out_images=n, results=table, objects=objects,
                **cls_attention_on_object(model, loader))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--model", default="vit12_convstem_w128_cluttered")
    ap.add_argument("--data", default="cluttered:../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    for ckpt in sorted(args.checkpoints, key=lambda p: [int(d) for d in re.findall(r"\d+", Path(p).stem)]):
        if Path(ckpt).stem in done:
            continue
        done[Path(ckpt).stem] = check(args.model, ckpt, args.data, args.held_out, args.keep)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, out)  # each checkpoint's result survives an interruption
        print(summary(done[Path(ckpt).stem]), file=sys.stderr)


def summary(r: dict) -> str:
    res = r["results"]
    lines = [f"{r['checkpoint']}: dense top-1 {res['dense']['top1']:.2f}%  CLS attention on object "
             f"{r['cls_attention_on_object']} (area {r['object_area_share']:.3f})"]
    for name, v in res.items():
        if name == "dense":
            continue
        floor = v.get("vs_random_floor") or {}
        extra = (f"  vs floor {floor['kl_to_dense']:+.4f} {[round(x, 4) for x in floor['kl_to_dense_ci95']]}"
                 if floor else "")
        obj = r["objects"].get(name, {})
        recall = {k: round(x, 2) for k, x in obj.get("object_recall", {}).items()}
        lines.append(f"  {name:22s} KL {v['kl_to_dense']:.4f}  GMACs {v['gmacs']:.4f}{extra}  recall {recall}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
