"""The alphas of the RL4EViT scan for the three budgets of benchmarks/archive/rl4evit_reference.sh.

    python benchmarks/archive/rl4evit_alphas.py multi|single

From the scan runs/rl4evit/<agents>_a*/metrics.json (greedy GMACs on 1,000 test images after the
scan's steps), the alpha whose GMACs are closest to each target fraction of the dense GMACs (0.75,
0.65, 0.55), a different alpha per target. Prints the three alphas. (Matching fixed-count methods
to a policy's GMACs, and random tokens at its counts, is `leanvit match`.)
"""
import json
import sys
from pathlib import Path

import torch

import leanvit

TARGETS = (0.75, 0.65, 0.55)


def main(agents: str):
    dense = leanvit.count_macs(leanvit.load_model("cifar10_vit12_w128"), torch.zeros(1, 3, 32, 32))
    scan = {}
    for p in Path("runs/rl4evit").glob(f"{agents}_a*"):
        if (p / "metrics.json").is_file():
            scan[p.name.split("_a")[1]] = json.loads((p / "metrics.json").read_text())["history"][-1]["gmacs"] / dense
    for a, r in sorted(scan.items(), key=lambda kv: float(kv[0])):
        print(f"alpha {a}: {r:.3f} of dense GMACs", file=sys.stderr)
    chosen = []
    for t in TARGETS:
        chosen.append(min((a for a in scan if a not in chosen), key=lambda a: abs(scan[a] - t)))
    print(" ".join(chosen))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "multi")
