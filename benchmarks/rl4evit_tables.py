"""Tables I and II of BENCHMARKS.md (RL4EViT section) from the raw results that
benchmarks/rl4evit_reference.sh wrote to benchmarks/results/rl4evit/. Prints markdown.

GMACs in results written from commit 4051bed (``Reduction.decision_macs``) on include RL4EViT's
actor and DynamicViT's predictors; the tables published before it (2026-11-22) leave them out."""
import json
from pathlib import Path

RES = Path("benchmarks/results/rl4evit")


def load(path):
    return json.loads(Path(path).read_text())


def scan_table():
    """The alpha scan and the training runs: greedy top-1 / GMACs on 1,000 test images after each
    evaluation of the run (step 30 = the scan, step 90 = the runs of the tables). Copies every run's
    metrics.json to benchmarks/results/rl4evit/runs/."""
    import leanvit
    import torch
    dense = leanvit.count_macs(leanvit.load_model("cifar10_vit12_w128"), torch.zeros(1, 3, 32, 32))
    (RES / "runs").mkdir(exist_ok=True)
    runs = {}
    for p in sorted(Path("runs/rl4evit").glob("*/metrics.json")):
        (RES / "runs" / f"{p.parent.name}.json").write_text(p.read_text())
    for p in sorted((RES / "runs").glob("*_a*.json")):
        agents, alpha = p.stem.split("_a")
        runs[(agents, float(alpha))] = load(p)["history"]
    print("Alpha scan (beta = 1; greedy policy, 1,000 test images)\n")
    print("| agents | alpha | step | rollout keep ratio | top-1 % | GMACs | of dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (agents, alpha), hist in sorted(runs.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        for h in hist:
            print(f"| {agents} | {alpha:g} | {h['step']} | {h['keep_ratio']:.3f} | {h['top1']:.1f} | "
                  f"{h['gmacs']:.4f} | {h['gmacs'] / dense:.3f} |")
    print()


def main():
    scan_table()
    alphas = (RES / "alphas.txt").read_text().split()
    single_alphas = (RES / "single_alphas.txt").read_text().split()
    budgets = [line.split() for line in (RES / "budgets.txt").read_text().splitlines() if line.strip()]
    sweep = load(RES / "sweep" / "results.json")
    dense = sweep["dense"]
    rows = {r["method"] + ":" + r["label"].replace(" ", ":"): r for r in sweep["rows"]}

    def find(method, label_part, exact=False):
        hits = [r for k, r in rows.items() if k.startswith(method + ":")
                and (k == f"{method}:{label_part}" if exact else label_part in k)]
        assert len(hits) == 1, (method, label_part, list(rows))
        return hits[0]

    def cells(r, d=dense):
        return (f"{r['top1']:.2f} | {r['top1'] - dense['top1']:+.2f} | {r['gmacs']:.4f} | "
                f"{r['gmacs'] / dense['gmacs']:.3f} | {r['images_per_second']:.0f} | "
                f"{r['images_per_second'] / d['images_per_second']:.2f}x")

    print("Table I\n")
    print("| budget | method | setting | top-1 % | vs dense | GMACs | of dense | img/s | speedup |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| - | dense | | {dense['top1']:.2f} | - | {dense['gmacs']:.4f} | 1.000 | "
          f"{dense['images_per_second']:.0f} | 1.00x |")
    counts = [l for l in (RES / "counts.txt").read_text().splitlines() if l.startswith("random:")]
    for i, (alpha, (run, g, rho, evit, tome, ppt)) in enumerate(zip(alphas, budgets)):
        b = f"{i + 1} (alpha {alpha})"
        for m, spec in (("evit", evit), ("tome", tome), ("ppt", ppt)):
            label = spec.split(":", 1)[1]
            print(f"| {b} | {m} | `{label}` | {cells(find(m, label, exact=True))} |")
        dv = load(RES / f"dynamicvit_k{rho}" / "results.json")
        r = dv["rows"][0]
        print(f"| {b} | dynamicvit (fine-tuned) | `keep_rate={rho}` | {cells(r, dv['dense'])} |")
        mappo = find("rl4evit", f"multi_a{alpha}/")
        print(f"| {b} | **rl4evit (MAPPO)** | `alpha={alpha}` | {cells(mappo)} |")
    print("\nTable II\n")
    print("| budget | method | top-1 % | vs dense | GMACs | of dense | img/s | speedup |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for i, (alpha, single) in enumerate(zip(alphas, single_alphas)):
        b = f"{i + 1} (alpha {alpha})"
        sched = counts[i].split("=", 1)[1]
        rnd = find("random", "schedule=" + sched, exact=True)
        print(f"| {b} | random at MAPPO's token counts (`schedule={sched}`) | {cells(rnd)} |")
        print(f"| {b} | single-agent PPO (alpha {single}) | {cells(find('rl4evit', f'single_a{single}/'))} |")
        print(f"| {b} | **MAPPO** | {cells(find('rl4evit', f'multi_a{alpha}/'))} |")
    # the actor's part of the GMACs column: it runs on every live patch at each decision layer
    import leanvit
    import torch
    m = leanvit.adapt(leanvit.load_model("cifar10_vit12_w128"), "rl4evit").method
    per_token = sum(l.in_features * l.out_features for l in m.actor if isinstance(l, torch.nn.Linear))
    print(f"\nActor MACs per token per decision layer: {per_token}. Actor GMACs per image (MAPPO, from "
          "the mean counts of counts.txt), included in the GMACs column above:")
    means = [l for l in (RES / "counts.txt").read_text().splitlines() if "mean tokens per block" in l]
    for alpha, line in zip(alphas, means):
        counts = [float(c) for c in line.split(":")[-1].split()]
        patches = sum(counts[l] - 1 for l in m.layers)  # live patches entering each decision
        r = find('rl4evit', f'multi_a{alpha}/')
        g = patches * per_token / 1e9
        print(f"- alpha {alpha}: {patches:.1f} patch decisions, {g:.4f} GMACs; without it "
              f"{r['gmacs'] - g:.4f} GMACs = {(r['gmacs'] - g) / dense['gmacs']:.3f} of dense")
    print(f"\n{sweep['n_images']} images, {sweep['threads']} threads, batch {sweep['batch_size']}, "
          f"{sweep['date']}; DynamicViT rows: their own sweep against their fine-tuned ViT "
          f"(dense of that ViT: " + ", ".join(
              f"k{b[2]}: {load(RES / f'dynamicvit_k{b[2]}' / 'results.json')['dense']['top1']:.2f}%"
              for b in budgets) + "); its speedup is against that sweep's dense pass.")


if __name__ == "__main__":
    main()
