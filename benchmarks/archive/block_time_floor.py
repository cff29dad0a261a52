"""How fast can a per-image method be at batch 1, on this machine? (issue 12, batch-1 goal)

GMACs promise a speedup proportional to the MACs removed. A block of a ViT does not take time in
proportion to its tokens at batch 1: with few tokens each linear layer still reads all of its
weights. This script measures, in one run and on one model:

1. ``leanvit.bench.benchmark`` one image at a time: dense, each method, and each method's random
   floor (random tokens at its per-image counts);
2. timm's own attention half (norm1, attention, residual) and MLP half (norm2, MLP, residual) of
   a block on (1, N, C) tokens for a grid of N (through all blocks in turn, per block), median of
   repeats; priced like this, the dense forward should cost what timm's forward measures (printed);
3. per method the *timm-block bound*: each image's traced token counts per block priced by (2)
   (linear between grid points), plus the patch embedding and head as dense runs them. That is
   the speed of timm's own blocks at exactly the method's counts, with no decision, no packing
   and nothing of leanvit's: what the method could reach if all of its overhead were gone.

measured / bound says how much leanvit and the decision lose; bound / GMACs ratio says how much
the hardware gives of the GMACs at these token counts.

    python benchmarks/archive/block_time_floor.py --out benchmarks/results/packed/block_time_floor_deit_s_b1.json
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import leanvit
from leanvit.bench import benchmark
from leanvit.data import eval_transform, load_dataset, make_loader
from leanvit.models import create_model
from leanvit.options import parse_spec
from leanvit.provenance import provenance, write_json

GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 197)


def timed(fn, x, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(x)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def block_halves(blocks, width: int, grid, repeats: int) -> dict:
    """Seconds per block of timm's attention half and MLP half on (1, N, width) tokens, per N: each
    half run through all ``blocks`` in turn and divided by their number, so that every call
    reads another block's weights, as a forward does (one block called again and again would
    find its weights in cache)."""
    def attn(x):
        for blk in blocks:
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))  # timm's Block.forward, first half
        return x

    def mlp(x):
        for blk in blocks:
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x

    out = {"attention": {}, "mlp": {}}
    with torch.inference_mode():
        for n in grid:
            x = torch.randn(1, n, width)
            for name, fn in (("attention", attn), ("mlp", mlp)):
                fn(x)
                inner = max(1, int(0.05 / max(timed(fn, x, 1, 1), 1e-6)))  # about 50 ms per repeat
                out[name][n] = timed(fn, x, repeats, inner) / len(blocks)
    return out


def price(table: dict, n: float) -> float:
    """Linear between the measured token counts (exact on the grid)."""
    ns = sorted(table)
    if n <= ns[0]:
        return table[ns[0]]
    for a, b in zip(ns, ns[1:]):
        if n <= b:
            return table[a] + (table[b] - table[a]) * (n - a) / (b - a)
    return table[ns[-1]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--data", default="../shared/data/imagenette-val-224.tar")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["ats:tokens=0.5", "tome:r=13", "evit:keep_rate=0.7"],
                    help="token methods (the bound prices full-width blocks: no channel methods)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes=args.num_classes).eval()
    ds = load_dataset(args.data, split="val", transform=eval_transform(model), num_classes=args.num_classes,
                      limit=args.images)
    images = next(iter(make_loader(ds, batch_size=args.images, num_workers=0))).images  # as `leanvit bench` takes them
    specs = [(text, s.method, s.options) for text, s in zip(args.methods, map(parse_spec, args.methods))]
    result = benchmark(model, specs, images, repeats=args.repeats, warmup=2, threads=args.threads,
                       one_at_a_time=True)
    width = model.embed_dim
    halves = block_halves(model.blocks, width, GRID, args.repeats)  # the blocks of a plain ViT cost alike
    n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    with torch.inference_mode():  # what dense runs besides the blocks: patch embedding, final norm, head
        rest = timed(lambda x: model.forward_head(model.norm(model.norm_pre(model._pos_embed(model.patch_embed(x))))),
                     images[:1], args.repeats, 5)
    priced_dense = rest + len(model.blocks) * (halves["attention"][n_tokens] + halves["mlp"][n_tokens])
    dense_time = statistics.median(result["dense"]["timm_seconds"]) / images.shape[0]  # per image, timm's forward
    rows = {}
    for label, name, opts in specs:
        runner = leanvit.adapt(model, name, **opts)
        per_image = []
        with torch.inference_mode():
            for i in range(images.shape[0]):
                with runner.tracing() as trace:
                    runner(images[i:i + 1])
                blocks = [r for r in trace if r["layer"] is not None]
                if any(r["heads"] is not None or r["hidden"] is not None for r in blocks):
                    raise SystemExit(f"{label}: runs blocks at other widths; the bound prices full-width blocks")
                per_image.append(rest + sum(price(halves["attention"], float(r["attn_tokens"][0]))
                                            + price(halves["mlp"], float(r["mlp_tokens"][0])) for r in blocks))
        m = result["methods"][label]
        bound = priced_dense / statistics.mean(per_image)
        rows[label] = dict(speedup=m["speedup"], gmacs_ratio=m["gmacs_ratio"], efficiency=m["efficiency"],
                           floor_speedup=m.get("floor_speedup"), timm_block_bound_speedup=bound,
                           measured_over_bound=m["speedup"] / bound, bound_over_gmacs_ratio=bound / m["gmacs_ratio"])
    payload = dict(settings=dict(result["settings"], grid=list(GRID)), dense=dict(
        timm_seconds_per_image=dense_time, priced_seconds_per_image=priced_dense, rest_seconds=rest),
        block_halves={k: {str(n): t for n, t in v.items()} for k, v in halves.items()}, methods=rows,
        bench=result, provenance=provenance(model=args.model, data=args.data, split="val", limit=args.images))
    write_json(Path(args.out), payload)
    s = result["settings"]
    print(f"{args.model}, batch 1 ({s['images']} images), {s['threads']} threads, median of {s['repeats']}, {s['date']}; "
          f"timm's forward {1000 * dense_time:.1f} ms, priced from its parts {1000 * priced_dense:.1f} ms")
    print("| method | GMACs ratio | measured speedup | efficiency | random floor | timm blocks at its counts "
          "| measured / timm blocks | timm blocks / GMACs ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        floor = f"{r['floor_speedup']:.2f}x" if r["floor_speedup"] is not None else "-"
        print(f"| `{label}` | {r['gmacs_ratio']:.2f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {floor} | "
              f"{r['timm_block_bound_speedup']:.2f}x | {r['measured_over_bound']:.2f} | {r['bound_over_gmacs_ratio']:.2f} |")
    print("\ntimm's block halves at batch 1, ms per call (N tokens): " + ", ".join(
        f"N={n}: {1000 * halves['attention'][n]:.2f} + {1000 * halves['mlp'][n]:.2f}" for n in GRID))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
