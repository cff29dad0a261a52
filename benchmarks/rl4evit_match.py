"""Budgets for the RL4EViT comparison on the reference model (cifar10_vit12_w128).

  alphas [multi|single]: from the alpha scan of those agents (runs/rl4evit/<agents>_a*/metrics.json,
          greedy GMACs on 1,000 test images after the scan's steps), the alpha closest to each
          target fraction of the dense GMACs (0.75, 0.65, 0.55), one alpha per target. Prints the
          three alphas.
  specs RUN_DIR...: for each trained policy (its last greedy GMACs), the DynamicViT keep rate, EViT
          keep rate, ToMe r and PPT r (threshold=scaled) whose GMACs are closest. Their token counts
          do not depend on the image, so their GMACs are exact from one forward. Prints one line
          per run: run_dir rl4evit_gmacs dynamicvit_keep_rate evit_spec tome_spec ppt_spec.
"""
import json
import sys
from pathlib import Path

import torch

import leanvit

TARGETS = (0.75, 0.65, 0.55)


def last_gmacs(run_dir) -> float:
    return json.loads((Path(run_dir) / "metrics.json").read_text())["history"][-1]["gmacs"]


def main(argv):
    torch.set_num_threads(1)
    model = leanvit.load_model("cifar10_vit12_w128")
    x = torch.zeros(1, 3, 32, 32)
    dense = leanvit.count_macs(model, x)
    if argv[0] == "alphas":
        agents = argv[1] if len(argv) > 1 else "multi"
        scan = {float(p.name.split("_a")[1]): last_gmacs(p) / dense for p in Path("runs/rl4evit").glob(f"{agents}_a*")
                if (p / "metrics.json").is_file()}
        for a, r in sorted(scan.items()):
            print(f"alpha {a}: {r:.3f} of dense GMACs", file=sys.stderr)
        chosen = []
        for t in TARGETS:
            a = min((a for a in scan if a not in chosen), key=lambda a: abs(scan[a] - t))
            chosen.append(a)
        print(" ".join(str(a) for a in chosen))
        return
    grids = {
        "dynamicvit": [(f"{k / 100:.2f}", dict(keep_rate=k / 100)) for k in range(30, 100)],
        "evit": [(f"evit:keep_rate={k / 100:.2f}", dict(keep_rate=k / 100)) for k in range(30, 100)],
        "tome": [(f"tome:r={r}", dict(r=r)) for r in range(1, 9)],
        "ppt": [(f"ppt:r={r}:threshold=scaled", dict(r=r, threshold="scaled")) for r in range(2, 31)],
    }
    macs = {m: [(spec, leanvit.count_macs(leanvit.adapt(model, m, **o), x)) for spec, o in g]
            for m, g in grids.items()}
    for run in argv[1:]:
        g = last_gmacs(run)
        best = [min(macs[m], key=lambda s: abs(s[1] - g))[0] for m in ("dynamicvit", "evit", "tome", "ppt")]
        print(run, f"{g:.5f}", *best)


if __name__ == "__main__":
    main(sys.argv[1:])
