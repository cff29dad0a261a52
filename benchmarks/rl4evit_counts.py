"""Mean tokens per block (CLS included) that a trained RL4EViT policy keeps on the reference model,
and the matching `random:schedule=...` spec: random tokens kept at the policy's mean counts, the
"Random at equal keep rate" control of Table II.

Usage: python benchmarks/rl4evit_counts.py POLICY.safetensors [...] [--limit 2000] [--data PATH]
"""
import argparse

import torch

import leanvit
from leanvit.data import eval_transform, load_dataset, make_loader
from leanvit.flops import tokens_per_block


def main():
    p = argparse.ArgumentParser()
    p.add_argument("policies", nargs="+")
    p.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--limit", type=int, default=2000, help="class-balanced test subset")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = leanvit.load_model("cifar10_vit12_w128")
    data = load_dataset(args.data, split="test", transform=eval_transform(model), num_classes=10, limit=args.limit)
    for path in args.policies:
        runner = leanvit.adapt(model, "rl4evit", weights=path)
        sums, n = None, 0
        with torch.inference_mode():
            for batch in make_loader(data, batch_size=250, num_workers=0):
                with runner.tracing() as trace:
                    runner(batch.images)
                counts = tokens_per_block(trace).double()  # (blocks, B)
                sums = counts.sum(1) if sums is None else sums + counts.sum(1)
                n += counts.shape[1]
        mean = (sums / n).tolist()
        sched = ",".join(str(max(2, round(c))) for c in mean)
        print(f"{path}: mean tokens per block ({n} images): " + " ".join(f"{c:.1f}" for c in mean))
        print(f"random:schedule={sched}")


if __name__ == "__main__":
    main()
