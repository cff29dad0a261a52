"""Where a forward's time goes, operator by operator: every ATen operator that one batch runs,
with the line of leanvit/timm that called it, its count and its time, and the total against the
forward's wall time without profiling (the difference is per-op cost outside the operators);
the method (or its floor) and the dense model alternate in one process.

    python benchmarks/op_profile.py [--model cifar10_vit12_w128_prance] [--method prance:weights=cifar10_vit12_w128_prance]
        [--batch 32] [--runner method|floor|dense] [--top 30]

Timing through a dispatch mode adds a little to every operator; compare runs of this script.
"""
import argparse
import collections
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leanvit
from leanvit.bench import floor_of
from leanvit.data import eval_transform, load_dataset, make_loader
from leanvit.options import parse_spec


class _Timed(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.stats = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        frames = [f for f in traceback.extract_stack() if "leanvit" in f.filename or "timm" in f.filename]
        where = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        rec = self.stats[(str(func).replace("aten.", "").replace(".default", ""), where)]
        rec[0] += 1
        rec[1] += dt
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cifar10_vit12_w128_prance")
    ap.add_argument("--method", default="prance:weights=cifar10_vit12_w128_prance")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runner", choices=("method", "floor", "dense"), default="method",
                    help="what to profile next to the dense model (dense: the dense model alone)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = leanvit.load_model(args.model).eval()
    # the images `leanvit bench --data ... --split test --batch-size B` times
    ds = load_dataset(args.data, split="test", transform=eval_transform(model), limit=args.batch)
    images = next(iter(make_loader(ds, batch_size=args.batch, num_workers=0))).images
    spec = parse_spec(args.method)
    method = leanvit.adapt(model, spec.method, **spec.options)
    runners = {args.runner: {"method": method, "floor": floor_of(method, images)}.get(args.runner),
               "dense": leanvit.adapt(model, "none")}
    if runners[args.runner] is None:
        runners.pop(args.runner)
    # one process, the runners alternating repeat by repeat, so the VM's drift hits both alike
    modes = {k: _Timed() for k in runners}
    walls = {k: [] for k in runners}
    with torch.inference_mode():
        for r in runners.values():
            for _ in range(3):
                r(images)
        for _ in range(args.repeats):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r(images)
                walls[k].append(time.perf_counter() - t0)
                with modes[k]:
                    r(images)
    R = args.repeats
    for k, r in runners.items():
        stats = modes[k].stats
        print(f"{args.model} {args.method if k != 'dense' else 'none'} ({k}), batch {args.batch}, "
              f"{leanvit.count_macs(r, images):.4f} GMACs/image, 2 threads, {time.strftime('%Y-%m-%d')}")
        for (op, where), (n, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"{1000 * t / R:7.2f} ms {n // R:5d}  {op:<28} {where[:100]}")
        total = sum(t for _, t in stats.values()) / R
        print(f"operators: {1000 * total:.1f} ms per forward in {sum(n for n, _ in stats.values()) // R} calls; "
              f"wall time without profiling {1000 * sorted(walls[k])[R // 2]:.1f} ms (median of {R})")


if __name__ == "__main__":
    main()
