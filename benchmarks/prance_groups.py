"""How many sub-batches PRANCE's per-image decisions make: for each selector, the mean number of
groups of images that run each of stages 2-4 in a batch, as executed (a group splits further at
every later decision) and as it would be if images with the same token count and choice were
regrouped across branches before each stage.

    python benchmarks/prance_groups.py cifar10_vit12_w128_prance runs/prance-sel/merge/budget-0.5/selector.safetensors ...

Selector weights by name or path; all run on the shipped meta-network, first 256 CIFAR-10 test
images in batches of 32.
"""
import argparse
from collections import Counter

import torch

import leanvit
from leanvit.data import eval_transform, load_dataset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("selectors", nargs="+")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = leanvit.load_model("cifar10_vit12_w128_prance")
    ds = load_dataset(args.data, split="test", transform=eval_transform(model), limit=args.images)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    batches = range(0, len(x), args.batch_size)
    print("| selector | groups per batch, stages 2/3/4 as run | regrouped by (tokens, choice) |")
    print("|---|---|---|")
    for weights in args.selectors:
        runner = leanvit.adapt(model, "prance", weights=weights)
        method, decide = runner.method, runner.method.decide
        calls = []  # (stage, tokens, choices) of every decision, one per group entering the stage

        def recording(state, k):
            choices, record = decide(state, k)
            calls.append((k, state.n_patches, choices))
            return choices, record
        method.decide = recording
        run, regrouped = Counter(), Counter()
        with torch.no_grad():
            for b in batches:
                calls.clear()
                runner(x[b:b + args.batch_size])
                for k, n, choices in calls:
                    run[k] += len(set(choices))
                for k in {k for k, _, _ in calls}:
                    regrouped[k] += len({(n, c) for kk, n, cs in calls if kk == k for c in cs})

        def fmt(c):
            return " / ".join(f"{c[k] / len(batches):.1f}" for k in sorted(c))
        print(f"| {weights} | {fmt(run)} | {fmt(regrouped)} |")


if __name__ == "__main__":
    main()
