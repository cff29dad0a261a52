"""Markdown tables of benchmarks/packed_speed.sh's results (benchmarks/results/packed/*.json).

Usage: python benchmarks/packed_tables.py > benchmarks/results/packed/tables.md
"""
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "packed"
RUNS = [("prance_b32", "PRANCE, shipped meta-network"), ("prance_b1", "PRANCE, shipped meta-network"),
        ("reference_b32", "reference model"), ("reference_b1", "reference model"),
        ("deit_s_b32", "DeiT-S 224, random weights, Imagenette photos"),
        ("deit_s_b1", "DeiT-S 224, random weights, Imagenette photos")]


def spread(seconds, images):
    """min-max of the repeats' speed, as images/s"""
    speeds = sorted(images / t for t in seconds)
    return f"{speeds[0]:.0f}-{speeds[-1]:.0f}"


for name, what in RUNS:
    path = RESULTS / f"{name}.json"
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
