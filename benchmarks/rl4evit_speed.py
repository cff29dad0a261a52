"""Where the time of greedy RL4EViT inference goes, on the shipped policy of the reference model.

Times, interleaved repeat by repeat (median), over the same images in batches: the dense model,
rl4evit as one padded batch (``group_size=None``), the actor alone on exactly the tokens it
scored (its padded inputs, captured in one forward), and the token floor (random tokens at
rl4evit's padded widths: the blocks without the actor and without masks); optionally rl4evit
with other options (``--methods``) and the dense model run in chunks of a few images (small
GEMMs, ``--dense-chunks``). Also prints GMACs per image (actor included), with and without padding.

Usage: python benchmarks/rl4evit_speed.py [--images 256] [--batch-size 64] [--threads 1] [--repeats 5]
    [--clock cpu] [--dense-chunks 16] [--methods rl4evit:group_size=16 ...]
"""
import argparse
import random
import statistics
import time

import torch

import leanvit
from leanvit.cli import parse_method_spec
from leanvit.bench import token_schedule
from leanvit.data import eval_transform, load_dataset, make_loader


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--images", type=int, default=256, help="class-balanced test subset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this thread's CPU time (with --threads 1 all work runs on it), robust on a busy machine")
    p.add_argument("--dense-chunks", type=int, nargs="*", default=[],
                   help="also time dense on each batch cut into chunks of this many images (small GEMMs)")
    p.add_argument("--methods", nargs="*", default=[], help="extra method specs to time, e.g. rl4evit:groups=4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = leanvit.load_model("cifar10_vit12_w128")
    data = load_dataset(args.data, split="test", transform=eval_transform(model), num_classes=10, limit=args.images)
    batches = [b.images for b in make_loader(data, batch_size=args.batch_size, num_workers=0)]
    dense = leanvit.adapt(model, "none")
    rl = leanvit.adapt(model, "rl4evit", weights="cifar10_vit12_w128", group_size=None)
    runners = {"dense": dense, "rl4evit": rl}  # one padded batch
    for spec in args.methods:
        name, opts = parse_method_spec(spec)[1:]
        runners[spec] = leanvit.adapt(model, name, weights="cifar10_vit12_w128", **opts)

    actor_inputs = []  # per batch, the (B, width, C) patches the actor scored at each decision layer
    hook = rl.method.actor.register_forward_hook(lambda m, i, o: actor_inputs[-1].append(i[0]))
    with torch.inference_mode():
        for x in batches:
            actor_inputs.append([])
            rl(x)
    hook.remove()
    floors = [leanvit.adapt(model, "random", schedule=token_schedule(rl, x)) for x in batches]

    clock = time.perf_counter if args.clock == "wall" else time.thread_time

    def run(label):
        with torch.inference_mode():
            t0 = clock()
            for i, x in enumerate(batches):
                if label == "actor alone":
                    for t in actor_inputs[i]:
                        rl.method.actor(t)
                elif label.startswith("dense in chunks of "):
                    for c in x.split(int(label.rsplit(" ", 1)[1])):
                        dense(c)
                elif label == "floor (padded widths, no actor)":
                    floors[i](x)
                else:
                    runners[label](x)
            return clock() - t0

    labels = list(runners) + ["actor alone", "floor (padded widths, no actor)"] + \
        [f"dense in chunks of {c}" for c in args.dense_chunks]
    times = {k: [] for k in labels}
    for r in range(args.repeats + 1):  # the first round warms up
        random.Random(r).shuffle(labels)
        for k in labels:
            t = run(k)
            if r:
                times[k].append(t)
    n = sum(x.shape[0] for x in batches)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} CIFAR-10 test images, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} interleaved repeats, {args.clock} clock")
    print(f"{'':<34}{'s':>8}{'img/s':>9}{'x dense':>9}")
    for k in times:
        print(f"{k:<34}{med[k]:>8.3f}{n / med[k]:>9.1f}{med['dense'] / med[k]:>9.2f}")
    print(f"actor share of rl4evit time: {med['actor alone'] / med['rl4evit']:.3f}")
    g = {k: sum(leanvit.count_macs(r, x, padded=pad) * x.shape[0] for x in batches) / n
         for k, r, pad in [("dense", dense, False), ("rl4evit", rl, False), ("rl4evit padded", rl, True)]}
    for spec in args.methods:
        g[spec] = sum(leanvit.count_macs(runners[spec], x) * x.shape[0] for x in batches) / n
        g[spec + " padded"] = sum(leanvit.count_macs(runners[spec], x, padded=True) * x.shape[0] for x in batches) / n
    widths = [token_schedule(rl, x) for x in batches]
    for k, v in g.items():
        print(f"GMACs {k:<28}{v:.4f}  ({v / g['dense']:.3f} of dense)")
    print("padded widths after the decisions (blocks 4, 7, 10) per batch:", [[w[l + 1] for l in rl.method.layers] for w in widths])


if __name__ == "__main__":
    main()
