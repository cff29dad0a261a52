"""What runs around a per-image method's decision, counted (no timing: counts do not depend on the
machine's load): for each method on its reference model at batch 32, and for its random floor (the
same per-image token counts and widths, random tokens: ``leanvit.bench.floor_of``), one forward's

- ATen operator calls, in total and per kind: host syncs (``_local_scalar_dense``: ``.item()``,
  ``int()``/``bool()`` of a tensor; ``nonzero``; ``equal``; copies to the host), sorts (sort,
  argsort, topk), gathers and scatters (gather, index, index_select, index_copy, scatter), and
- packed-layout rebuilds (``packing.Layout`` constructions, each one host sync and a few copies),

with the lines of leanvit that called the syncs, sorts and gathers. ``method - floor`` is the
decision's own bookkeeping.

    python tools/decision_profile.py [--json benchmarks/results/guard/decision_profile.json]

The batch: the first 32 images of the CIFAR-10 test sample shipped with leanvit (real images, so
the decisions are the models' own).
"""
from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leanvit
try:
    from leanvit import packing
except ImportError:  # an older commit, profiled for a static method: no packed execution to count
    packing = None
from leanvit.zoo import ZOO_DIR

KINDS = {
    "host sync": ("item", "_local_scalar_dense", "nonzero", "equal", "is_nonzero", "index[bool]"),
    "sort": ("sort", "argsort", "topk"),
    "gather/scatter": ("gather", "index", "index_select", "index_copy", "index_copy_", "index_put_", "scatter",
                       "scatter_", "scatter_add_", "masked_select"),
}
CASES = {  # label: (model, method, options); a model not in leanvit's zoo is built with seeded random weights
    "rl4evit": ("cifar10_vit12_w128", "rl4evit", dict(weights=str(ZOO_DIR / "cifar10_vit12_w128.rl4evit.safetensors"))),
    "ats": ("cifar10_vit12_w128", "ats", {}),
    "prance": ("cifar10_vit12_w128_prance", "prance",
               dict(weights=str(ZOO_DIR / "cifar10_vit12_w128_prance.prance.safetensors"))),
    # a static method: no floor; compare its counts across commits (PYTHONPATH=<commit's src>)
    "tome": ("deit_small_patch16_224", "tome", dict(r=13)),
}
STATIC = {"tome"}


def kind_of(op: str) -> str:
    base = op.split(".")[0]
    for kind, names in KINDS.items():
        if base in names:
            return kind
    if base == "_to_copy":
        return "copy"
    return "other"


class CountOperators(TorchDispatchMode):
    """Every ATen call, by operator and by the line of leanvit that made it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = [f for f in traceback.extract_stack() if "/leanvit/" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        op = str(func).replace("aten.", "").replace(".default", "")
        if op == "index.Tensor" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            op = "index[bool]"  # boolean-mask indexing: a nonzero, i.e. a host sync
        self.calls[(op, where)] += 1
        return func(*args, **(kwargs or {}))


def count_forward(runner, images) -> dict:
    """One forward's operator counts by kind, its layout rebuilds, and the calling lines."""
    layouts = [0]
    init = packing.Layout.__init__ if packing else None

    def counted(self, state):
        layouts[0] += 1
        init(self, state)
    mode = CountOperators()
    if packing:
        packing.Layout.__init__ = counted
    try:
        with torch.inference_mode(), mode:
            runner(images)
    finally:
        if packing:
            packing.Layout.__init__ = init
    by_kind = collections.Counter()
    for (op, _), n in mode.calls.items():
        by_kind[kind_of(op)] += n
    lines = collections.Counter()
    for (op, where), n in mode.calls.items():
        if kind_of(op) not in ("other", "copy"):
            lines[f"{op} @ {where}"] += n
    ops = collections.Counter()
    for (op, _), n in mode.calls.items():
        ops[op] += n
    return dict(operators=sum(mode.calls.values()), layouts=layouts[0], **dict(by_kind),
                ops=dict(ops.most_common()), lines=dict(lines.most_common()))


def model_and_images(name: str, batch: int):
    """A zoo model and the first ``batch`` images of the shipped CIFAR-10 sample, or a timm model with
    seeded random weights and seeded noise images (its counts do not depend on the weights)."""
    if name in leanvit.list_models():
        from leanvit.data import EMBEDDED_CIFAR10, eval_transform, load_dataset  # here: older commits lack them
        model = leanvit.load_model(name)
        ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(model))
        return model, torch.stack([ds[i][0] for i in range(batch)])
    torch.manual_seed(0)
    model = leanvit.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    return model, torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--json", type=Path, help="also write the counts here")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = dict(date=time.strftime("%Y-%m-%d"), batch=args.batch, torch=torch.__version__, leanvit=leanvit.__file__,
               cases={})
    for label in args.cases:
        model_name, method, opts = CASES[label]
        model, images = model_and_images(model_name, args.batch)
        runner = leanvit.adapt(model, method, **opts)
        runners = {label: runner, "dense": leanvit.adapt(model, "none")}
        if label not in STATIC:
            from leanvit.bench import floor_of  # imported here: older commits, compared for static methods, lack it
            runners[f"{label} floor"] = floor_of(runner, images)
        for name, r in runners.items():
            c = count_forward(r, images)
            out["cases"][name] = c
            print(f"{name}: {c['operators']} operators, {c['layouts']} layouts, "
                  + ", ".join(f"{k} {c.get(k, 0)}" for k in (*KINDS, "copy")))
            for line, n in c["lines"].items():
                print(f"   {n:4d}  {line[:150]}")
        if f"{label} floor" not in out["cases"]:
            continue
        method, floor = out["cases"][label]["ops"], out["cases"][f"{label} floor"]["ops"]
        diff = {op: method.get(op, 0) - floor.get(op, 0) for op in {*method, *floor}}
        print(f"{label} - floor, by operator: " + ", ".join(
            f"{op} {d:+d}" for op, d in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if d))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
