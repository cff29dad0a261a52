"""The tables of BENCHMARKS.md from the raw results under benchmarks/results/, one driver:

    python benchmarks/tables.py packed  > benchmarks/results/packed/tables.md
    python benchmarks/tables.py prance  > benchmarks/results/prance_reference/tables.md
    python benchmarks/tables.py rl4evit > benchmarks/results/rl4evit/tables.md
    python benchmarks/tables.py rl4evit_v2 [RUN PREFIX, default multi_cheap_correct] > benchmarks/results/rl4evit_v2/tables.md
    python benchmarks/tables.py dynamicvit_v2 > benchmarks/results/dynamicvit_v2/tables.md
    python benchmarks/tables.py verdicts > benchmarks/results/verdicts.md
    python benchmarks/tables.py rl4evit_tables > benchmarks/results/rl4evit_v2/tables_I_II.md
    python benchmarks/tables.py reference > benchmarks/results/sweep_reference/tables.md
    python benchmarks/tables.py finetune_ppt > benchmarks/results/finetune_ppt/tables.md
    python benchmarks/tables.py prance_seeds {original,meta} > benchmarks/results/prance_{original,meta}/tables.md
    python benchmarks/tables.py prance_channels > benchmarks/results/prance_channels_meta/tables.md
    python benchmarks/tables.py cluttered > benchmarks/results/cluttered/tables.md

packed: benchmarks/packed_speed.sh; prance: benchmarks/archive/prance_selectors.sh and prance_speed.sh;
rl4evit_v2: benchmarks/rl4evit_v2.sh (3 seeds x 2 budgets, against the random floor and the
parameter-free curves of benchmarks/sweep_reference*.sh at equal GMACs);
rl4evit: benchmarks/archive/rl4evit_reference.sh (GMACs in results written from commit 4051bed,
``Reduction.decision_macs``, on include RL4EViT's actor and DynamicViT's predictors; the tables
published before it, 2026-11-22, leave them out).
"""
import json
import re
import statistics
import sys
from pathlib import Path

RES = Path(__file__).parent / "results"
RL = RES / "rl4evit"
REFERENCE_SWEEPS = ("sweep_reference", "sweep_reference_aggressive")
PRANCE_RUNS = Path("runs/prance-sel")


PACKED_RUNS = [("prance_b32", "PRANCE, shipped meta-network"), ("prance_b1", "PRANCE, shipped meta-network"),
        ("reference_b32", "reference model"), ("reference_b1", "reference model"),
        ("deit_s_b32", "DeiT-S 224, random weights, Imagenette photos"),
        ("deit_s_b1", "DeiT-S 224, random weights, Imagenette photos")]


def spread(seconds, images):
    """min-max of the repeats' speed, as images/s"""
    speeds = sorted(images / t for t in seconds)
    return f"{speeds[0]:.0f}-{speeds[-1]:.0f}"


def packed():
    """benchmarks/packed_speed.sh's runs (benchmarks/results/packed/*.json)."""
    for name, what in PACKED_RUNS:
        path = RES / "packed" / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        s, d = r["settings"], r["dense"]
        n = s["images"]
        print(f"**{what}**, batch {s['batch_size']} ({n} images), {s['threads']} threads, input "
              f"{'x'.join(map(str, s['input_size']))}, median of {s['repeats']} (warm-up {s['warmup']}), {s['date']}; "
              f"dense {d['images_per_second']:.0f} img/s (repeats {spread(d['seconds'], n)}), timm's own forward "
              f"{d['timm_images_per_second'] / d['images_per_second']:.2f}x leanvit's dense (`{path.name}`)\n")
        print("| method | GMACs | dense/GMACs | speedup | efficiency | floor speedup | floor efficiency | decision ms/batch |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, m in r["methods"].items():
            floor = m.get("floor_speedup")
            print(f"| `{label}` | {m['gmacs']:.4f} | {m['gmacs_ratio']:.2f} | {m['speedup']:.2f}x | {m['efficiency']:.2f} | "
                  f"{floor:.2f}x | {floor / m['gmacs_ratio']:.2f} | {m['decision_overhead_ms']:.1f} |")
        print()


SEL_RE = re.compile(r"runs/prance-sel/([^/]+)/budget-([0-9.]+)/selector\.safetensors")


def selector_of(options: dict):
    """(name, budget) of a prance row that runs a trained selector, else None."""
    m = SEL_RE.search(str(options.get("weights", "")))
    return (m.group(1), float(m.group(2))) if m else None


def training_table() -> str:
    """From the selectors' runs (runs/prance-sel, not committed; their metrics are then copied to
    benchmarks/results/prance_reference/selectors.json), else from that copy."""
    summary = {}
    for path in sorted(PRANCE_RUNS.glob("*/budget-*/metrics.json")):
        m = json.loads(path.read_text())
        summary[f"{path.parent.parent.name}/budget-{m['config']['budget']}"] = dict(
            steps=m["steps"], cost_weight=m["cost_weight"], gmacs_ratio=m["gmacs_ratio"], top1_train=m["top1"],
            budget_met=m["budget_met"], history=m["history"], config=m["config"])
    copy = RES / "prance_reference" / "selectors.json"
    if summary:
        copy.write_text(json.dumps(summary, indent=2))
    else:
        summary = json.loads(copy.read_text())
    lines = ["| selector | budget | steps | final cost weight | GMACs ratio (1,000 holdout images) "
             "| within 5% | calibration shift | min |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for key, m in summary.items():
        name, budget = key.split("/budget-")[0], m["config"]["budget"]
        last = m["history"][-1]
        shift = f"{last['calibration_shift']:+.3f}" if "calibration_shift" in last else "-"
        lines.append(f"| {name} | {budget} | {m['steps']} | {m['cost_weight']:.4f} | {m['gmacs_ratio']:.3f} | "
                     f"{'yes' if m['budget_met'] else '**no**'} | {shift} | {last['elapsed_s'] / 60:.0f} |")
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


def prance():
    """benchmarks/archive/prance_selectors.sh and benchmarks/archive/prance_speed.sh."""
    print("### Selector training\n\n" + training_table() + "\n\n### Test set\n\n" + test_table() +
          "\n\n### Measured speed\n\n" + speed_table())


def load(path):
    return json.loads(Path(path).read_text())


def scan_table():
    """The alpha scan and the training runs: greedy top-1 / GMACs on 1,000 test images after each
    evaluation of the run (step 30 = the scan, step 90 = the runs of the tables). Copies every run's
    metrics.json to benchmarks/results/rl4evit/runs/."""
    import leanvit
    import torch
    dense = leanvit.count_macs(leanvit.load_model("cifar10_vit12_w128"), torch.zeros(1, 3, 32, 32))
    runs = {}
    for p in sorted(Path("runs/rl4evit").glob("*/metrics.json")):
        (RL / "runs").mkdir(exist_ok=True)
        (RL / "runs" / f"{p.parent.name}.json").write_text(p.read_text())
    for p in sorted((RL / "runs").glob("*_a*.json")):
        agents, alpha = p.stem.split("_a")
        runs[(agents, float(alpha))] = load(p)["history"]
    if not runs:
        print("Alpha scan: no runs (runs/rl4evit/ nor benchmarks/results/rl4evit/runs/)\n")
        return
    print("Alpha scan (beta = 1; greedy policy, 1,000 test images)\n")
    print("| agents | alpha | step | rollout keep ratio | top-1 % | GMACs | of dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (agents, alpha), hist in sorted(runs.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        for h in hist:
            print(f"| {agents} | {alpha:g} | {h['step']} | {h['keep_ratio']:.3f} | {h['top1']:.1f} | "
                  f"{h['gmacs']:.4f} | {h['gmacs'] / dense:.3f} |")
    print()


def rl4evit():
    """Tables I and II (benchmarks/archive/rl4evit_reference.sh)."""
    scan_table()
    alphas = (RL / "alphas.txt").read_text().split()
    single_alphas = (RL / "single_alphas.txt").read_text().split()
    budgets = [line.split() for line in (RL / "budgets.txt").read_text().splitlines() if line.strip()]
    sweep = load(RL / "sweep" / "results.json")
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
    counts = [l for l in (RL / "counts.txt").read_text().splitlines() if l.startswith("random:")]
    for i, (alpha, (run, g, rho, evit, tome, ppt)) in enumerate(zip(alphas, budgets)):
        b = f"{i + 1} (alpha {alpha})"
        for m, spec in (("evit", evit), ("tome", tome), ("ppt", ppt)):
            label = spec.split(":", 1)[1]
            print(f"| {b} | {m} | `{label}` | {cells(find(m, label, exact=True))} |")
        dv = load(RL / f"dynamicvit_k{rho}" / "results.json")
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
    means = [l for l in (RL / "counts.txt").read_text().splitlines() if "mean tokens per block" in l]
    for alpha, line in zip(alphas, means):
        counts = [float(c) for c in line.split(":")[-1].split()]
        patches = sum(counts[l] - 1 for l in m.layers)  # live patches entering each decision
        r = find('rl4evit', f'multi_a{alpha}/')
        g = patches * per_token / 1e9
        print(f"- alpha {alpha}: {patches:.1f} patch decisions, {g:.4f} GMACs; without it "
              f"{r['gmacs'] - g:.4f} GMACs = {(r['gmacs'] - g) / dense['gmacs']:.3f} of dense")
    print(f"\n{sweep['n_images']} images, {sweep['threads']} threads, batch {sweep['batch_size']}, "
          f"{sweep['date']}; DynamicViT rows: their own sweep "
          f"({load(RL / f'dynamicvit_k{budgets[0][2]}' / 'results.json')['date']}) against their fine-tuned ViT "
          f"(dense of that ViT: " + ", ".join(
              f"k{b[2]}: {load(RL / f'dynamicvit_k{b[2]}' / 'results.json')['dense']['top1']:.2f}%"
              for b in budgets) + "); its speedup is against that sweep's dense pass.")
    print("\nDynamicViT against its own fine-tuned ViT (benchmarks/archive/dynamicvit_reference.sh)\n")
    print("| keep rate | dense of its ViT, top-1 % | DynamicViT top-1 % | vs its dense (95% CI) | agree % | "
          "KL | GMACs | of dense |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for b in budgets:
        dv = load(RL / f"dynamicvit_k{b[2]}" / "results.json")
        r, d = dv["rows"][0], dv["dense"]
        lo, hi = r["delta_top1_ci95"]
        print(f"| {b[2]} | {d['top1']:.2f} | {r['top1']:.2f} | {r['delta_top1']:+.2f} ({lo:+.2f}, {hi:+.2f}) | "
              f"{r['agreement']:.2f} | {r['kl_to_dense']:.4f} | {r['gmacs']:.4f} | {r['gmacs'] / d['gmacs']:.3f} |")


def mean_std(values, digits):
    """"mean ± std" over seeds (sample std; one value: just it)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def interval(v: dict, key: str, digits: int) -> str:
    lo, hi = v[key + "_ci95"]
    return f"{v[key]:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" + ("*" if lo > 0 or hi < 0 else "")


def rl4evit_v2(prefix: str = "multi_cheap_correct"):
    """benchmarks/rl4evit_v2.sh: per seed and budget the policy on the 10,000 test images against
    random tokens at its own per-image counts (the floor), then mean ± std over seeds, and the
    parameter-free curves (benchmarks/sweep_reference*.sh) at the policies' mean GMACs."""
    runs = []
    for p in sorted((RES / "rl4evit_v2").glob(f"{prefix}_b*_s*")):
        if not (p / "sweep" / "results.json").exists():
            continue
        budget, seed = re.match(r".*_b([0-9.]+)_s(\d+)$", p.name).groups()
        sweep, train = load(p / "sweep" / "results.json"), load(p / "train_metrics.json")
        row = next(r for r in sweep["rows"] if r["method"] == "rl4evit")
        control = next(r for r in sweep["rows"] if r["method"] == "random")
        runs.append(dict(budget=float(budget), seed=int(seed), dense=sweep["dense"], row=row,
                         decision_gmacs=train["decision_gmacs"],
                         extra={"held-out GMACs ratio (train)": f"{train['gmacs_ratio']:.3f}",
                                "random at mean counts: top-1 / KL": f"{control['top1']:.2f} / {control['kl_to_dense']:.4f}"}))
    learned_vs_floor(prefix, runs, "policies'", "actor")


def dynamicvit_v2():
    """benchmarks/finetune_method.sh: DynamicViT (predictors and ViT fine-tuned) per seed and budget,
    with fidelity to the *original* dense model, against random tokens at its counts on the same
    fine-tuned ViT; the fine-tuned ViT's own dense KL says how much of DynamicViT's is fine-tuning."""
    runs = []
    for p in sorted((RES / "dynamicvit_v2").glob("b*_s*")):
        if not (p / "sweep" / "results.json").exists():
            continue
        budget, seed = re.match(r"b([0-9.]+)_s(\d+)$", p.name).groups()
        sweep = load(p / "sweep" / "results.json")
        row = next(r for r in sweep["rows"] if r["method"] == "dynamicvit")
        tuned = next(r for r in sweep["rows"] if r["method"] == "none")
        runs.append(dict(budget=float(budget), seed=int(seed), dense=sweep["dense"], row=row,
                         decision_gmacs=None, extra={
                             "fine-tuned ViT dense: top-1 / agree / KL":
                                 f"{tuned['top1']:.2f} / {tuned['agreement']:.2f} / {tuned['kl_to_dense']:.4f}"}))
    learned_vs_floor("DynamicViT, keep rate matched to the budget", runs, "runs'", "predictor")


def fixed_rule(sweeps):
    """A function g -> (rule, KL to dense) of the best parameter-free rule of ``sweeps`` (their rows
    merged; random, the control, and trained methods left out) at g GMACs: each curve's KL linear
    between its measured settings at g, and every measured setting at or below g (+2%), as a rule
    that is as cheap and closer to dense beats too. None where no rule reaches g."""
    from leanvit.analysis import at_gmacs
    rows = [r for x in sweeps for r in x["rows"]
            if r["method"] not in ("random", "none") and "weights" not in r["options"]]

    def best(g):
        rules = {k: v[0] for k, v in at_gmacs([{"rows": rows}], [g], metric="kl_to_dense").items() if v[0] is not None}
        rules.update({f"{r['method']} {r['label']}": r["kl_to_dense"] for r in rows if r["gmacs"] <= g * 1.02})
        return min(rules.items(), key=lambda kv: kv[1]) if rules else None
    return best


def best_fixed_rule(gmacs: float):
    """(rule, KL to dense) of the best parameter-free rule of the reference sweeps on the original
    model at ``gmacs`` (see :func:`fixed_rule`)."""
    refs = [load(RES / name / "results.json") for name in REFERENCE_SWEEPS if (RES / name / "results.json").exists()]
    return fixed_rule(refs)(gmacs)


def learned_vs_floor(title: str, runs: list, whose: str, decision: str, rule=None):
    """Per seed and budget a learned method on the test images against its random floor, then
    mean ± std over seeds and the best parameter-free curve at the same mean GMACs. ``runs``: dicts
    of budget, seed, dense, row (a sweep row with ``random_floor``), decision_gmacs, extra columns;
    ``rule``: the fixed-rule lookup (default: the reference sweeps on the original model)."""
    rule = rule or best_fixed_rule
    print(f"Per seed ({title}; {runs[0]['row']['n_images'] if runs else 0:,} test images; floor = random tokens "
          f"at the method's own per-image counts, same images; * = the paired 95% interval excludes 0)\n")
    extra = list(runs[0]["extra"]) if runs else []  # the first before the test columns, the rest after
    head = ["budget", "seed", *extra[:1], "test GMACs ratio", "top-1 %", "agree %", "KL", "floor top-1", "floor KL",
            "KL - floor [95%]", "agree - floor [95%]", "top-1 - floor [95%]", *extra[1:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * (len(head) - 3 - len(extra[1:])) + "---|" * (3 + len(extra[1:])))
    for r in sorted(runs, key=lambda r: (r["budget"], r["seed"])):
        row, f, v = r["row"], r["row"]["random_floor"], r["row"]["vs_random_floor"]
        cols = list(r["extra"].values())
        cells = [r["budget"], r["seed"], *cols[:1], f"{row['gmacs'] / r['dense']['gmacs']:.3f}", f"{row['top1']:.2f}",
                 f"{row['agreement']:.2f}", f"{row['kl_to_dense']:.4f}", f"{f['top1']:.2f}", f"{f['kl_to_dense']:.4f}",
                 interval(v, "kl_to_dense", 4), interval(v, "agreement", 2), interval(v, "top1", 2), *cols[1:]]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\nOver seeds (mean ± std), and the best parameter-free rule at the {whose} mean GMACs "
          "(linear between its measured settings, or any cheaper setting)\n")
    print(f"| budget | seeds | within 5% of budget | GMACs ratio | {decision} GMACs | top-1 % | agree % | KL | "
          "KL - floor | best parameter-free KL at equal GMACs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    by_budget = {}
    for r in runs:
        by_budget.setdefault(r["budget"], []).append(r)
    for budget, seeds in sorted(by_budget.items()):
        rows = [r["row"] for r in seeds]
        ratios = [row["gmacs"] / r["dense"]["gmacs"] for row, r in zip(rows, seeds)]
        met = sum(abs(x / budget - 1) <= 0.05 for x in ratios)
        col = lambda key: [row[key] for row in rows]  # noqa: E731
        best = rule(statistics.mean(col("gmacs")))
        best = f"{best[0]} {best[1]:.4f}" if best else ""
        decision = [r["decision_gmacs"] for r in seeds if r["decision_gmacs"] is not None]
        print(f"| {budget} | {len(seeds)} | {met}/{len(seeds)} (test) | {mean_std(ratios, 3)} | "
              f"{mean_std(decision, 4) if decision else 'in GMACs'} | {mean_std(col('top1'), 2)} | "
              f"{mean_std(col('agreement'), 2)} | {mean_std(col('kl_to_dense'), 4)} | "
              f"{mean_std([row['vs_random_floor']['kl_to_dense'] for row in rows], 4)} | {best} |")


def seeds_of(glob_root: Path, pattern: str, method: str):
    """[(row, sweep)] of ``method`` in every finished sweep of the runs matching ``pattern``; where
    the sweep also ran it off the shelf, its row on the ViT fine-tuned with it (a ``checkpoint``)."""
    out = []
    for p in sorted(glob_root.glob(pattern)):
        if (p / "sweep" / "results.json").exists():
            x = load(p / "sweep" / "results.json")
            rows = [r for r in x["rows"] if r["method"] == method]
            out.append((max(rows, key=lambda r: "checkpoint" in r["options"]), x))
    return out


# The learned methods judged on both testbeds: label -> {testbed: (results folder, run prefix)},
# with the method's name in the sweep rows (the folder's runs are <prefix>_b<budget>_s<seed>/sweep/).
VERDICT_METHODS = (
    ("RL4EViT MAPPO, authors' actor [4C, 256, 64]", "rl4evit",
     {"cluttered": ("cluttered/mappo", "multi_default-ln-kept_correct_")}),
    ("RL4EViT MAPPO, cheap actor [64] (the CIFAR-10 default)", "rl4evit",
     {"CIFAR-10": ("rl4evit_v2", "multi_cheap-ln-kept_correct_"),
      "cluttered": ("cluttered/mappo-cheap", "multi_cheap-ln-kept_correct_")}),
    ("RL4EViT MAPPO, cheap actor, no input LayerNorm, r2 to every agent", "rl4evit",
     {"CIFAR-10": ("rl4evit_v2", "multi_cheap_correct_")}),
    ("RL4EViT MAPPO, same, reward kl", "rl4evit", {"CIFAR-10": ("rl4evit_v2", "multi_cheap_kl_")}),
    ("RL4EViT single-agent PPO, cheap actor", "rl4evit",
     {"CIFAR-10": ("rl4evit_v2", "single_cheap-ln-kept_correct_"),
      "cluttered": ("cluttered/single", "single_cheap-ln-kept_correct_")}),
    ("DynamicViT (ViT fine-tuned with it; KL to the original dense)", "dynamicvit",
     {"CIFAR-10": ("dynamicvit_v2", ""), "cluttered": ("cluttered/dynamicvit", "")}),
    ("EViT, ViT fine-tuned with it (KL to the original dense)", "evit", {"cluttered": ("cluttered/evit", "")}),
)
# where each testbed's PRANCE sweeps and fixed-rule sweeps are, under benchmarks/results
TESTBED_SWEEPS = {
    "CIFAR-10": dict(prance="", fixed=REFERENCE_SWEEPS, meta_fixed=("prance_reference",),
                     shipped="prance_reference/shipped_floor"),
    "cluttered": dict(prance="cluttered/", fixed=("cluttered/fixed",), meta_fixed=(), shipped=None),
}


def verdict_groups(testbed: str):
    """[(label, budget, [(row, dense)], fixed-rule lookup)] of every learned method run on ``testbed``."""
    where = TESTBED_SWEEPS[testbed]
    rule = fixed_rule([load(RES / n / "results.json") for n in where["fixed"] if (RES / n / "results.json").exists()])
    groups = []
    for label, method, folders in VERDICT_METHODS:
        if testbed in folders:
            folder, prefix = folders[testbed]
            for budget in (0.5, 0.7):
                runs = seeds_of(RES / folder, f"{prefix}b{budget}_s*", method)
                groups.append((label, budget, [(r, x["dense"]) for r, x in runs], rule))
    meta = prance_sweeps("meta", where["prance"])
    # the meta-network's own fixed rules: its fixed sub-networks (in its sweeps) and the shipped one's sweep
    meta_rule = fixed_rule([load(RES / n / "results.json") for n in where["meta_fixed"]] + [x for _, x in meta])
    shipped = where["shipped"] and RES / where["shipped"] / "results.json"
    if shipped and shipped.exists():
        x = load(shipped)
        groups.append(("PRANCE shipped selector (meta-network)", 0.5,
                       [(next(r for r in x["rows"] if "weights" in r["options"]), x["dense"])], meta_rule))
    for net, title, net_rule in (("original", "original model, channels off", rule), ("meta", "meta-network", meta_rule),
                                 ("authors", "meta-network", meta_rule)):
        selectors = {}
        for _, x in prance_sweeps(net, where["prance"]):
            for r in x["rows"]:  # benchmarks/prance_seeds.sh: .../<strategy>_s<seed>/budget-<B>/selector.safetensors,
                # or cost-<W>/ for a fixed cost weight (COST_WEIGHT), the "budget" then being "fixed cost <W>"
                m = re.search(r"/([\w-]+)_s\d+/(budget|cost)-([\d.]+)/", r["options"].get("weights", ""))
                if m:
                    budget = float(m.group(3)) if m.group(2) == "budget" else f"fixed cost {m.group(3)}"
                    selectors.setdefault((m.group(1), budget), []).append((r, x["dense"]))
        for (strategy, budget), rows in sorted(selectors.items(), key=str):
            strategy = "channels only" if strategy == "none" else strategy
            groups.append((f"PRANCE {strategy} ({title})", budget, rows, net_rule))
    return [g for g in groups if g[2]]


def verdict_cells(rows, fixed) -> dict:
    """The verdict of one method at one budget over its seeds: against its random floor (KL - floor,
    seeds whose interval excludes 0 below / above) and against the best fixed rule at its GMACs."""
    kl = [r["kl_to_dense"] for r, _ in rows]
    ci = [r["vs_random_floor"]["kl_to_dense_ci95"] for r, _ in rows]
    below, above = sum(hi < 0 for _, hi in ci), sum(lo > 0 for lo, _ in ci)
    best = fixed(statistics.mean(r["gmacs"] for r, _ in rows))
    return dict(seeds=len(rows), ratio=mean_std([r["gmacs"] / d["gmacs"] for r, d in rows], 3), kl=mean_std(kl, 4),
                floor=mean_std([r["random_floor"]["kl_to_dense"] for r, _ in rows], 4),
                diff=f"{statistics.mean(r['vs_random_floor']['kl_to_dense'] for r, _ in rows):+.4f} ({below} / {above})",
                beats_floor="yes" if below == len(rows) else "no" if above else "within noise",
                fixed=f"{best[0]} {best[1]:.4f}" if best else "-",
                beats_fixed="-" if not best else "yes" if max(kl) < best[1] else "no")


def object_cells(rows) -> str:
    """Object recall at the first decision (the method / random tokens at its counts) and the
    adaptivity (Spearman of the tokens an image gets against its object's area), mean over seeds."""
    objs = [r["objects"] for r, _ in rows if r.get("objects")]
    if not objs:
        return "- | -"
    first = [o["object_recall"][min(o["object_recall"], key=int)] for o in objs if o["object_recall"]]
    floor = [o["floor_object_recall"][min(o["floor_object_recall"], key=int)] for o in objs if o.get("floor_object_recall")]
    adapt = [o["adaptivity_tokens"] for o in objs if o["adaptivity_tokens"] is not None]
    recall = (f"{statistics.mean(first):.2f}" if first else "-") + (f" / {statistics.mean(floor):.2f}" if floor else "")
    return f"{recall} | {statistics.mean(adapt):+.2f}" if adapt else f"{recall} | -"


def verdicts():
    """Every learned method at 0.5 and 0.7 of dense on both testbeds, side by side: against random
    tokens at its own per-image counts (and widths) and against the best fixed rule at equal GMACs,
    in KL; on the cluttered testbed also what it keeps (object recall) and how it adapts. Then each
    testbed's full table."""
    by_testbed = {t: {(g[0], g[1]): g for g in verdict_groups(t)} for t in TESTBED_SWEEPS}
    keys = sorted({k for groups in by_testbed.values() for k in groups}, key=lambda k: (str(k[1]), k[0]))
    print("Side by side: KL - floor (mean over seeds; seeds whose paired 95% interval excludes 0: below / above); "
          "beats the best fixed rule at equal GMACs; on the cluttered testbed object recall at the first decision "
          "(method / random tokens at its counts) and adaptivity (Spearman, tokens vs object area)\n")
    print("| budget | method | CIFAR-10: KL - floor | beats fixed | cluttered: KL - floor | beats fixed | "
          "object recall | adaptivity |")
    print("|---:|---|---|---|---|---|---|---|")
    for label, budget in keys:
        cells = []
        for testbed in TESTBED_SWEEPS:
            g = by_testbed[testbed].get((label, budget))
            c = verdict_cells(g[2], g[3]) if g else None
            seeds = c and f"{c['seeds']} seed" + "s" * (c["seeds"] > 1)
            cells += [f"{c['diff']}, {seeds}" if c else "not run", c["beats_fixed"] if c else "-"]
        g = by_testbed["cluttered"].get((label, budget))
        print(f"| {budget} | {label} | " + " | ".join(cells) + f" | {object_cells(g[2]) if g else '- | -'} |")
    for testbed, groups in by_testbed.items():
        print(f"\n{testbed} testbed\n")
        print("| budget | method | seeds | GMACs ratio | KL to dense | floor KL | KL - floor (mean; seeds whose interval "
              "excludes 0: below / above) | beats random at its counts | best fixed rule at equal GMACs: KL | "
              "beats it |")
        print("|---:|---|---:|---:|---:|---:|---|---|---|---|")
        for (label, budget), (_, _, rows, fixed) in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
            c = verdict_cells(rows, fixed)
            print(f"| {budget} | {label} | {c['seeds']} | {c['ratio']} | {c['kl']} | {c['floor']} | {c['diff']} | "
                  f"{c['beats_floor']} | {c['fixed']} | {c['beats_fixed']} |")
    print("\nfloor: random tokens at the method's own per-image counts (and widths), same images; a fixed rule "
          "(ToMe, EViT, PPT, ATS; on a meta-network also its fixed sub-networks) counts at the method's mean GMACs, "
          "linear between its measured settings, or any cheaper setting that is closer")


TABLE_POLICIES = (("MAPPO", "multi_cheap_correct"), ("MAPPO, input LayerNorm, r2 to kept", "multi_cheap-ln-kept_correct"),
                  ("single-agent PPO, input LayerNorm, r2 to kept", "single_cheap-ln-kept_correct"))


def summary_cells(runs) -> str:
    """GMACs ratio, top-1, Δ top-1 (its paired interval for one run), agreement, KL, speedup: mean ± std
    over the runs (each speedup against the dense pass of its own sweep)."""
    rows = [r for r, _ in runs]
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    one = len(rows) == 1
    delta = interval(rows[0], "delta_top1", 2) if one else mean_std(col("delta_top1"), 2)
    speed = f"{rows[0]['speedup']:.2f}x [{rows[0]['speedup_iqr'][0]:.2f}, {rows[0]['speedup_iqr'][1]:.2f}]" if one \
        else f"{mean_std(col('speedup'), 2)}x"
    return (f"{len(rows)} | {mean_std([r['gmacs'] / x['dense']['gmacs'] for r, x in runs], 3)} | "
            f"{mean_std(col('top1'), 2)} | {delta} | {mean_std(col('agreement'), 2)} | "
            f"{mean_std(col('kl_to_dense'), 4)} | {speed} |")


def rl4evit_tables():
    """Tables I and II of RL4EViT on the reference model from the v2 runs (benchmarks/rl4evit_v2.sh,
    finetune_method.sh) and the parameter-free sweeps (sweep_reference*.sh), at 0.5 and 0.7 of dense:
    Table I against the other methods, at each method's measured setting nearest the budget; Table
    II the ablations (single-agent PPO, random tokens at the policy's own per-image counts)."""
    refs = [load(RES / name / "results.json") for name in REFERENCE_SWEEPS]
    head = ("| budget | method | setting | runs | GMACs ratio | top-1 % | vs dense [95%] or mean | agree % | KL | "
            "speedup [IQR over batches] or mean |\n|---:|---|---|---:|---:|---:|---|---:|---:|---:|")
    print("Table I (10,000 test images; dense = the reference model, "
          f"{refs[0]['dense']['top1']:.2f}%, {refs[0]['dense']['gmacs']:.4f} GMACs; speedup against the dense "
          "pass of the same sweep; runs > 1: mean ± std over seeds)\n")
    print(head)
    for budget in (0.5, 0.7):
        for method in ("tome", "ppt", "evit", "random"):
            rows = [(r, x) for x in refs for r in x["rows"] if r["method"] == method
                    and r["options"].get("threshold", "scaled") == "scaled"]
            r, x = min(rows, key=lambda rx: abs(rx[0]["gmacs"] / rx[1]["dense"]["gmacs"] - budget))
            print(f"| {budget} | {method} | `{r['label']}` | {summary_cells([(r, x)])}")
        dv = seeds_of(RES / "dynamicvit_v2", f"b{budget}_s*", "dynamicvit")
        if dv:
            print(f"| {budget} | DynamicViT (ViT fine-tuned with it) | `keep_rate={dv[0][0]['options']['keep_rate']}` | "
                  f"{summary_cells(dv)}")
        for label, prefix in TABLE_POLICIES[:2]:
            runs = seeds_of(RES / "rl4evit_v2", f"{prefix}_b{budget}_s*", "rl4evit")
            if runs:
                print(f"| {budget} | **RL4EViT ({label})** | `--budget {budget}` | {summary_cells(runs)}")
    print("\nTable II (the ablations, same images; floor = random tokens at each policy's own per-image "
          "token counts, no actor to pay for; KL - floor: mean over seeds, with how many seeds' paired 95% "
          "intervals lie below / above 0; last column: random tokens at the policy's mean counts per block, "
          "the same for every image)\n")
    print("| budget | method | runs | GMACs ratio | top-1 % | agree % | KL | speedup | floor: GMACs ratio | "
          "floor: top-1 % | floor: KL | floor: speedup | KL - floor (below / above) | random at the mean counts per block: KL |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for budget in (0.5, 0.7):
        for label, prefix in TABLE_POLICIES:
            runs = seeds_of(RES / "rl4evit_v2", f"{prefix}_b{budget}_s*", "rl4evit")
            if not runs:
                continue
            rows = [r for r, _ in runs]
            floors = [r["random_floor"] for r in rows]
            ratio = lambda rs: mean_std([r["gmacs"] / x["dense"]["gmacs"] for r, (_, x) in zip(rs, runs)], 3)  # noqa: E731
            diff = [r["vs_random_floor"]["kl_to_dense_ci95"] for r in rows]
            print(f"| {budget} | {label} | {len(rows)} | {ratio(rows)} | {mean_std([r['top1'] for r in rows], 2)} | "
                  f"{mean_std([r['agreement'] for r in rows], 2)} | {mean_std([r['kl_to_dense'] for r in rows], 4)} | "
                  f"{mean_std([r['speedup'] for r in rows], 2)}x | {ratio(floors)} | "
                  f"{mean_std([f['top1'] for f in floors], 2)} | {mean_std([f['kl_to_dense'] for f in floors], 4)} | "
                  f"{mean_std([f['speedup'] for f in floors], 2)}x | "
                  f"{statistics.mean(r['vs_random_floor']['kl_to_dense'] for r in rows):+.4f} "
                  f"({sum(hi < 0 for _, hi in diff)} / {sum(lo > 0 for lo, _ in diff)}) | "
                  f"{mean_std([next(r for r in x['rows'] if r['method'] == 'random')['kl_to_dense'] for _, x in runs], 4)} |")


EQUAL_GMACS = (0.089, 0.095, 0.105, 0.115, 0.125, 0.14, 0.155)


def reference():
    """benchmarks/sweep_reference.sh (default and aggressive): every parameter-free method
    on the reference model with fidelity to dense, then top-1 and KL at equal GMACs."""
    from leanvit.analysis import at_gmacs
    sweeps = [load(RES / name / "results.json") for name in REFERENCE_SWEEPS]
    dense = sweeps[0]["dense"]
    print(f"{sweeps[0]['n_images']} test images, batch {sweeps[0]['batch_size']}, {sweeps[0]['threads']} threads, "
          f"{sweeps[0]['date']}; dense {dense['top1']:.2f}%, {dense['gmacs']:.4f} GMACs, "
          f"{dense['images_per_second']:.0f} img/s\n")
    def kl_cell(r):  # the mean KL and its 95% interval over the images (sweeps from 2026-12-04 on)
        ci = r.get("kl_to_dense_ci95")
        return f"{r['kl_to_dense']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")

    print("| method, budget | top-1 % | vs dense (95% CI) | agree % | KL to dense [95%] | GMACs | speedup [IQR] | "
          "PPT prune % per layer |")
    print("|---|---:|---|---:|---:|---:|---|---|")
    for sweep in sweeps:
        for r in sweep["rows"]:
            lo, hi = r["delta_top1_ci95"]
            sig = "*" if lo > 0 or hi < 0 else ""
            prune = r["extra"].get("prune_fraction_per_layer") or {}
            prune = " / ".join(f"{100 * v:.1f}" for _, v in sorted(prune.items(), key=lambda kv: int(kv[0])))
            q1, q3 = r["speedup_iqr"]
            label = r["label"].replace("threshold=", "τ=")
            print(f"| `{r['method']}` {label} | {r['top1']:.2f} | {r['delta_top1']:+.2f}{sig} ({lo:+.2f}, {hi:+.2f}) | "
                  f"{r['agreement']:.2f} | {kl_cell(r)} | {r['gmacs']:.3f} | {r['speedup']:.2f}x "
                  f"[{q1:.2f}, {q3:.2f}] | {prune} |")
    # the KL interval's bounds, linear along each curve as the KL itself
    bounds = [{"rows": [dict(r, kl_lo=r["kl_to_dense_ci95"][0], kl_hi=r["kl_to_dense_ci95"][1])
                        for r in x["rows"] if r.get("kl_to_dense_ci95")]} for x in sweeps]
    lo_hi = [at_gmacs(bounds, EQUAL_GMACS, metric=m) for m in ("kl_lo", "kl_hi")]
    for metric, digits in (("top1", 2), ("kl_to_dense", 4), ("agreement", 2)):
        table = at_gmacs(sweeps, EQUAL_GMACS, metric=metric)
        print(f"\n{metric} at equal GMACs (linear along each curve; blank outside a curve's range"
              + ("; [95%]: the interval's bounds, linear too" if metric == "kl_to_dense" and lo_hi[0] else "") + ")\n")
        print("| curve | " + " | ".join(f"{g:.3f} G ({g / dense['gmacs']:.2f})" for g in EQUAL_GMACS) + " |")
        print("|---|" + "---:|" * len(EQUAL_GMACS))
        for key, vals in table.items():
            if sum(v is not None for v in vals) > 0:
                cells = ["" if v is None else f"{v:.{digits}f}" for v in vals]
                if metric == "kl_to_dense" and key in lo_hi[0]:
                    cells = [c + (f" [{lo:.4f}, {hi:.4f}]" if c and lo is not None and hi is not None else "")
                             for c, lo, hi in zip(cells, lo_hi[0][key], lo_hi[1][key])]
                print(f"| {key} | " + " | ".join(cells) + " |")

PRANCE_NETS = {"original": "channels off, the original reference model", "meta": "the shipped meta-network"}


def prance_sweeps(net: str, under: str = ""):
    """[(folder, sweep)] of benchmarks/prance_seeds.sh for NET=net: benchmarks/results/<under>prance_<net>,
    and prance_<net>_s<seed> for seeds swept on their own (SEEDS=2 RES=...), which hold no selector twice."""
    dirs = [RES / f"{under}prance_{net}"] + sorted((RES / under).glob(f"prance_{net}_s*"))
    return [(d, load(d / "results.json")) for d in dirs if (d / "results.json").exists()]


def prance_seeds(net: str = "original"):
    """benchmarks/prance_seeds.sh (NET=original|meta): per strategy, seed and budget each selector on
    the test images against random tokens at its own per-image counts and widths, then mean ± std
    over seeds and the best fixed rule on the same network at the selectors' mean GMACs."""
    sweeps = prance_sweeps(net)
    fixed = [RES / "prance_reference" / "results.json"] if net == "meta" else [RES / n / "results.json" for n in REFERENCE_SWEEPS]
    rule = fixed_rule([load(p) for p in fixed] + [x for _, x in sweeps])
    by_strategy = {}
    for res, sweep, row in [(d, x, r) for d, x in sweeps for r in x["rows"]]:
        m = re.search(r"/([\w-]+)_s(\d+)/budget-([\d.]+)/", row["options"].get("weights", ""))
        if not m:
            continue
        strategy, seed, budget = m.group(1), int(m.group(2)), float(m.group(3))
        train = load(res / f"{strategy}_s{seed}" / f"budget-{m.group(3)}" / "train_metrics.json")
        last = train["history"][-1]
        f = row["random_floor"]
        by_strategy.setdefault(strategy, []).append(dict(
            budget=budget, seed=seed, dense=sweep["dense"], row=row, decision_gmacs=last.get("decision_gmacs"),
            extra={"held-out GMACs ratio (train)": f"{train['gmacs_ratio']:.3f}",
                   "speedup / floor": f"{row['speedup']:.2f}x / {f['speedup']:.2f}x",
                   "configs per 32 (held-out)": f"{last['configs_per_32']:.1f}"}))
    for strategy, runs in sorted(by_strategy.items()):
        learned_vs_floor(f"PRANCE {strategy}, {PRANCE_NETS[net]}", runs, "selectors'", "selector", rule)
        print()


def prance_channels():
    """benchmarks/prance_seeds.sh with NET=meta STRATEGIES=none FLOOR=shuffled: the channel-only selectors
    (per image and stage, widths only) against their shuffled floor, the same widths dealt to other
    images of the batch at random; and the fixed sub-networks and best parameter-free rule at their GMACs."""
    sweep = load(RES / "prance_channels_meta" / "results.json")
    rule = fixed_rule([load(RES / "prance_reference" / "results.json"), sweep])
    print(f"{sweep['n_images']:,} test images, {sweep['date']}; shuffled floor = each batch's per-image widths dealt "
          "to its images in a random order (same MACs); * = the paired 95% interval excludes 0\n")
    print("| budget | seed | GMACs ratio | top-1 % | agree % | KL | shuffled floor KL | KL - shuffled [95%] | "
          "agree - shuffled [95%] | top-1 - shuffled [95%] |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    runs = []
    for row in sweep["rows"]:
        m = re.search(r"/none_s(\d+)/budget-([\d.]+)/", row["options"].get("weights", ""))
        if m:
            runs.append((float(m.group(2)), int(m.group(1)), row))
    for budget, seed, row in sorted(runs, key=lambda r: r[:2]):
        v = row["vs_shuffled_floor"]
        print(f"| {budget} | {seed} | {row['gmacs'] / sweep['dense']['gmacs']:.3f} | {row['top1']:.2f} | "
              f"{row['agreement']:.2f} | {row['kl_to_dense']:.4f} | {row['shuffled_floor']['kl_to_dense']:.4f} | "
              f"{interval(v, 'kl_to_dense', 4)} | {interval(v, 'agreement', 2)} | {interval(v, 'top1', 2)} |")
    print("\n| budget | seeds | GMACs ratio | KL | shuffled floor KL | KL - shuffled | seeds below / above the floor "
          "| best parameter-free KL at equal GMACs |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for budget in sorted({b for b, _, _ in runs}):
        rows = [r for b, _, r in runs if b == budget]
        v = [r["vs_shuffled_floor"] for r in rows]
        best = rule(statistics.mean(r["gmacs"] for r in rows))
        print(f"| {budget} | {len(rows)} | {mean_std([r['gmacs'] / sweep['dense']['gmacs'] for r in rows], 3)} | "
              f"{mean_std([r['kl_to_dense'] for r in rows], 4)} | "
              f"{mean_std([r['shuffled_floor']['kl_to_dense'] for r in rows], 4)} | "
              f"{mean_std([x['kl_to_dense'] for x in v], 4)} | "
              f"{sum(x['kl_to_dense_ci95'][1] < 0 for x in v)} / {sum(x['kl_to_dense_ci95'][0] > 0 for x in v)} | "
              + (f"{best[0]} {best[1]:.4f} |" if best else "- |"))


FINETUNE_PPT = RES / "finetune_ppt"
FT_WEIGHTS = (("", "shipped reference model (off the shelf)"), ("ft-dense", "+ 1 epoch dense (control)"),
              ("ft-ppt", "+ 1 epoch with PPT active"))


def finetune_ppt():
    """benchmarks/archive/finetune_ppt.sh: PPT, ToMe and EViT on the shipped model and on its two fine-tuned
    copies; first each against its own dense model, then everything against the shipped dense."""
    shipped = load(FINETUNE_PPT / "vs-shipped" / "results.json")

    def weights_of(row):  # "" (shipped), "ft-dense" or "ft-ppt", from the row's checkpoint= option
        m = re.search(r"checkpoint=runs/([\w-]+)/", row["label"])
        return m.group(1) if m else ""

    def cell(r):
        lo, hi = r["delta_top1_ci95"]
        sig = "*" if lo > 0 or hi < 0 else ""
        return (f"{r['top1']:.2f} ({r['delta_top1']:+.2f}{sig} [{lo:+.2f}, {hi:+.2f}]) / "
                f"{r['agreement']:.2f} / {r['kl_to_dense']:.4f}")

    methods = [r for r in shipped["rows"] if weights_of(r) == ""]
    header = "| weights | dense top-1 | " + " | ".join(f"{r['method']} {r['label']} ({r['gmacs']:.3f} G)"
                                                       for r in methods) + " |"
    print(f"{shipped['n_images']} test images, batch {shipped['batch_size']}, {shipped['threads']} threads, "
          f"{shipped['date']}. Each cell: top-1 % (difference to the dense model, paired 95% interval) / "
          "agreement % / KL(dense || method); * the interval excludes 0.\n")
    print("Against each weight set's own dense model:\n")
    print(header)
    print("|---|---:|" + "---|" * len(methods))
    for key, title in FT_WEIGHTS:
        sweep = shipped if key == "" else load(FINETUNE_PPT / key / "results.json")
        rows = {r["method"]: r for r in sweep["rows"] if weights_of(r) == ""}
        print(f"| {title} | {sweep['dense']['top1']:.2f} | " + " | ".join(cell(rows[m["method"]]) for m in methods) + " |")
    print(f"\nAgainst the shipped model's dense predictions ({shipped['dense']['top1']:.2f}%); "
          "the dense column is the fine-tuned dense model itself:\n")
    print(header)
    print("|---|---|" + "---|" * len(methods))
    for key, title in FT_WEIGHTS:
        rows = {r["method"]: r for r in shipped["rows"] if weights_of(r) == key}
        dense = cell(rows.pop("none")) if key else "-"
        print(f"| {title} | {dense} | " + " | ".join(cell(rows[m["method"]]) for m in methods) + " |")


def cluttered():
    """benchmarks/cluttered_controls.py on each checkpoint of the cluttered reference model (1,000
    held-out training images): dense top-1; EViT (without fusion, and fused) against random tokens at
    its own per-image counts; object recall after the first decision beside random's; where the CLS
    token's attention falls before the first decision, beside the object's share of the area."""
    controls = load(RES / "cluttered" / "controls.json")
    print("| checkpoint | dense top-1 % | EViT without fusion, keep 0.5: KL - floor [95%] | fused EViT, keep 0.7: "
          "KL - floor [95%] | object recall after block 3, keep 0.5: EViT without fusion / random | "
          "CLS attention on the object before block 3 (area) |")
    print("|---|---:|---|---|---|---|")
    for name, c in controls.items():
        res, obj = c["results"], c["objects"]
        first = min(obj["random 0.5"]["object_recall"], key=int)
        print(f"| {name} | {res['dense']['top1']:.1f} | {interval(res['evit nofuse 0.5']['vs_random_floor'], 'kl_to_dense', 4)} | "
              f"{interval(res['evit 0.7']['vs_random_floor'], 'kl_to_dense', 4)} | "
              f"{obj['evit nofuse 0.5']['object_recall'][first]:.2f} / {obj['random 0.5']['object_recall'][first]:.2f} | "
              f"{c['cls_attention_on_object'][first]:.0%} ({c['object_area_share']:.0%}) |")
    print("\n* the paired 95% interval excludes 0; negative: EViT closer to dense than random tokens at its counts")
    fixed = RES / "cluttered" / "fixed" / "results.json"
    if fixed.exists():
        print("\nWhat each method keeps on the 10,000 cluttered test images (benchmarks/cluttered_learned.sh: the fixed "
              "rules, and each learned run's sweep; learned methods: mean over seeds)\n")
        object_table(fixed)


def object_table(fixed: Path):
    """Object recall, background kept, adaptivity and the oracle floor of the fixed rules of
    ``fixed`` (a sweep on the cluttered test set) and of every learned method run there, by GMACs."""
    sweep = load(fixed)
    entries = [(f"{r['method']} {r['label']}", r["gmacs"] / sweep["dense"]["gmacs"], [r])
               for r in sweep["rows"]]
    for label, budget, rows, _ in verdict_groups("cluttered"):
        entries.append((f"{label}, " + (budget if isinstance(budget, str) else f"budget {budget}"), statistics.mean(r["gmacs"] / d["gmacs"] for r, d in rows),
                        [r for r, _ in rows]))
    print("| method | GMACs ratio | KL to dense | object recall, first decision: method / random at its counts | "
          "object recall, last decision | background kept, last | adaptivity: tokens / GMACs | oracle floor KL | "
          "KL - oracle |")
    print("|---|---:|---:|---|---:|---:|---|---:|---:|")

    def mean(key_of, rows, digits=2, sign=""):
        vals = [v for v in map(key_of, rows) if v is not None]
        return f"{statistics.mean(vals):{sign}.{digits}f}" if vals else "-"

    def at(recall, pick):
        return recall[pick(recall, key=int)] if recall else None
    for label, ratio, rows in sorted(entries, key=lambda e: -e[1]):
        obj = [r["objects"] for r in rows]
        print(f"| {label} | {ratio:.3f} | {mean(lambda r: r['kl_to_dense'], rows, 4)} | "
              f"{mean(lambda o: at(o['object_recall'], min), obj)} / "
              f"{mean(lambda o: at(o.get('floor_object_recall'), min), obj)} | "
              f"{mean(lambda o: at(o['object_recall'], max), obj)} | {mean(lambda o: at(o['background_kept'], max), obj)} | "
              f"{mean(lambda o: o['adaptivity_tokens'], obj, sign='+')} / {mean(lambda o: o['adaptivity_gmacs'], obj, sign='+')} | "
              f"{mean(lambda o: o['oracle_floor_kl'], obj, 4)} | "
              f"{mean(lambda o: o['vs_oracle_floor']['kl_to_dense'], obj, 4, '+')} |")
    print("\nrecall: share of the object's area its kept tokens stand for (a merged token stands for all its patches, so "
          "ToMe's and fused EViT's recall is 1 and only background kept tells); random at its counts: the method's own "
          "per-image counts, tokens drawn at random; adaptivity: Spearman over images against the object's area (- where "
          "every image gets the same); oracle: the object's patches kept first at the method's counts")


if __name__ == "__main__":
    tables = dict(packed=packed, prance=prance, rl4evit=rl4evit, rl4evit_v2=rl4evit_v2, dynamicvit_v2=dynamicvit_v2,
                  verdicts=verdicts, reference=reference, rl4evit_tables=rl4evit_tables,
                  finetune_ppt=finetune_ppt, prance_seeds=prance_seeds, prance_channels=prance_channels,
                  cluttered=cluttered)
    if len(sys.argv) < 2 or sys.argv[1] not in tables or len(sys.argv) > (3 if sys.argv[1] in ("rl4evit_v2", "prance_seeds") else 2):
        sys.exit(f"usage: python benchmarks/tables.py {{{','.join(tables)}}} (rl4evit_v2 takes a run prefix, "
                 "e.g. multi_cheap_kl; prance_seeds a network, original or meta)")
    tables[sys.argv[1]](*sys.argv[2:3])
