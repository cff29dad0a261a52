"""Tables I and II of BENCHMARKS.md (RL4EViT section) from the raw results that
benchmarks/rl4evit_reference.sh wrote to benchmarks/results/rl4evit/. Prints markdown."""
import json
from pathlib import Path

RES = Path("benchmarks/results/rl4evit")


def load(path):
    return json.loads(Path(path).read_text())


def main():
    alphas = (RES / "alphas.txt").read_text().split()
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
    for i, alpha in enumerate(alphas):
        b = f"{i + 1} (alpha {alpha})"
        sched = counts[i].split("=", 1)[1]
        rnd = find("random", "schedule=" + sched, exact=True)
        print(f"| {b} | random at MAPPO's token counts (`schedule={sched}`) | {cells(rnd)} |")
        print(f"| {b} | single-agent PPO | {cells(find('rl4evit', f'single_a{alpha}/'))} |")
        print(f"| {b} | **MAPPO** | {cells(find('rl4evit', f'multi_a{alpha}/'))} |")
    print(f"\n{sweep['n_images']} images, {sweep['threads']} threads, batch {sweep['batch_size']}, "
          f"{sweep['date']}; DynamicViT rows: their own sweep against their fine-tuned ViT "
          f"(dense of that ViT: " + ", ".join(
              f"k{b[2]}: {load(RES / f'dynamicvit_k{b[2]}' / 'results.json')['dense']['top1']:.2f}%"
              for b in budgets) + "); its speedup is against that sweep's dense pass.")


if __name__ == "__main__":
    main()
