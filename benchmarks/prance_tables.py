"""The PRANCE tables of BENCHMARKS.md from the runs of benchmarks/prance_selectors.sh and
benchmarks/prance_speed.sh:

    python benchmarks/prance_tables.py > benchmarks/results/prance_reference/tables.md

Also copies each selector's training metrics (runs/ is not committed) to
benchmarks/results/prance_reference/selectors.json.
"""
import json
import re
from pathlib import Path

RUNS = Path("runs/prance-sel")
RES = Path("benchmarks/results")
SEL_RE = re.compile(r"runs/prance-sel/([^/]+)/budget-([0-9.]+)/selector\.safetensors")


def selector_of(options: dict):
    """(name, budget) of a prance row that runs a trained selector, else None."""
    m = SEL_RE.search(str(options.get("weights", "")))
    return (m.group(1), float(m.group(2))) if m else None


def training_table() -> str:
    summary, lines = {}, ["| selector | budget | steps | final cost weight | GMACs ratio (1,000 holdout images) "
                          "| within 5% | calibration shift | min |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for path in sorted(RUNS.glob("*/budget-*/metrics.json")):
        m = json.loads(path.read_text())
        name, budget = path.parent.parent.name, m["config"]["budget"]
        summary[f"{name}/budget-{budget}"] = dict(
            steps=m["steps"], cost_weight=m["cost_weight"], gmacs_ratio=m["gmacs_ratio"], top1_train=m["top1"],
            budget_met=m["budget_met"], history=m["history"], config=m["config"])
        shift = f"{m['history'][-1]['calibration_shift']:+.3f}" if "calibration_shift" in m["history"][-1] else "-"
        lines.append(f"| {name} | {budget} | {m['steps']} | {m['cost_weight']:.4f} | {m['gmacs_ratio']:.3f} | "
                     f"{'yes' if m['budget_met'] else '**no**'} | {shift} | {m['history'][-1]['elapsed_s'] / 60:.0f} |")
    (RES / "prance_reference" / "selectors.json").write_text(json.dumps(summary, indent=2))
    return "\n".join(lines)


def test_table() -> str:
    r = json.loads((RES / "prance_reference" / "results.json").read_text())
    dense = r["dense"]
    lines = [f"{r['n_images']} test images, batch {r['batch_size']}, {r['threads']} threads, {r['date']}; "
             f"dense = the meta-network's largest sub-network ({dense['top1']:.2f}%, {dense['gmacs']:.4f} GMACs, "
             f"{dense['images_per_second']:.0f} img/s)", "",
             "| method | setting | top-1 % | vs dense (95% CI) | agree % | KL to dense | GMACs | of dense | img/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(r["rows"], key=lambda row: -row["gmacs"])
    for row in rows:
        sel = selector_of(row["options"])
        alpha = re.search(r"multi_a([0-9.]+)/", str(row["options"].get("weights", "")))
        if sel:
            name, setting = f"**prance {sel[0]}**", f"selector for budget {sel[1]}"
        elif row["method"] == "rl4evit" and alpha:
            name, setting = "rl4evit (MAPPO)", f"alpha {alpha.group(1)}, trained on the reference model"
        else:
            name, setting = row["method"], f"`{row['label']}`"
        lo, hi = row["delta_top1_ci95"]
        lines.append(f"| {name} | {setting} | {row['top1']:.2f} | {row['top1'] - dense['top1']:+.2f} "
                     f"({lo:+.2f}, {hi:+.2f}) | {row['agreement']:.2f} | {row['kl_to_dense']:.4f} | "
                     f"{row['gmacs']:.4f} | {row['gmacs'] / dense['gmacs']:.3f} | {row['images_per_second']:.0f} | "
                     f"{row['speedup']:.2f}x |")
    return "\n".join(lines)


def speed_table() -> str:
    out = []
    for tag, what in (("b32", "batch 32"), ("b1", "batch 1 (the same 32 images one at a time)")):
        path = RES / f"prance_speed_{tag}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        s = r["settings"]
        out += [f"{what}: {s['threads']} threads, input {'x'.join(map(str, s['input_size']))}, median of "
                f"{s['repeats']} repeats, {s['date']}; dense {r['dense']['images_per_second']:.0f} img/s", "",
                "| configuration | GMACs | dense/GMACs | measured speedup | speedup / (dense/GMACs) | floor speedup | floor / (dense/GMACs) |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for label, m in r["methods"].items():
            sel = selector_of(m["options"])
            name = f"prance {sel[0]}, budget {sel[1]}" if sel else label
            out.append(f"| {name} | {m['gmacs']:.4f} | {m['gmacs_ratio']:.2f} | {m['speedup']:.2f}x | "
                       f"{m['efficiency']:.2f} | {m['floor_speedup']:.2f}x | {m['floor_speedup'] / m['gmacs_ratio']:.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print("### Selector training\n\n" + training_table() + "\n\n### Test set\n\n" + test_table() +
          "\n\n### Measured speed\n\n" + speed_table())
