"""The model card of the shipped RL4EViT policy, src/leanvit/zoo/cifar10_vit12_w128.rl4evit.md,
from what benchmarks/rl4evit_reference.sh measured (run by benchmarks/rl4evit_publish.sh):

    python benchmarks/rl4evit_card.py ALPHA
"""
import json
import sys
from pathlib import Path

RES = Path("benchmarks/results/rl4evit")
CARD = Path("src/leanvit/zoo/cifar10_vit12_w128.rl4evit.md")


def main(alpha: str):
    policy = f"runs/rl4evit/multi_a{alpha}/policy.safetensors"
    sweep = json.loads((RES / "sweep" / "results.json").read_text())
    dense = sweep["dense"]
    row = next(r for r in sweep["rows"] if r["method"] == "rl4evit" and r["label"] == f"weights={policy}")
    run = json.loads(Path(f"runs/rl4evit/multi_a{alpha}/metrics.json").read_text())
    cfg, last = run["config"], run["history"][-1]
    counts = next(line for line in (RES / "counts.txt").read_text().splitlines() if line.startswith(policy))
    per_block = [float(c) for c in counts.split(":")[-1].split()]
    after = ", ".join(f"{per_block[b + 1]:.1f}" for b in (3, 6, 9))  # tokens in the block after each decision
    size = Path("src/leanvit/zoo/cifar10_vit12_w128.rl4evit.safetensors").stat().st_size / 2 ** 20
    ppo = cfg["ppo"]
    card = f"""# cifar10_vit12_w128.rl4evit

The RL4EViT policy (actor and critic, multi-agent PPO) trained for the reference model
`cifar10_vit12_w128`. Load it with
`leanvit.adapt(leanvit.load_model("cifar10_vit12_w128"), "rl4evit", weights="cifar10_vit12_w128")`
or `--method rl4evit --opt weights=cifar10_vit12_w128`. Decision layers after blocks 3, 6, 9;
actor 128-512-256-64-2, critic 256-512-256-64-1; the ViT itself is unchanged (frozen in training).

- **Top-1 on CIFAR-10 (JPEG) test, {row['n_images']} images: {row['top1']:.2f}%** (dense {dense['top1']:.2f}%),
  **{row['gmacs']:.4f} GMACs/image** ({row['gmacs'] / dense['gmacs']:.3f} of dense {dense['gmacs']:.4f}; the
  actor on every live patch at each decision included), measured {sweep['date']} by the `leanvit sweep` of
  `benchmarks/rl4evit_reference.sh` (row `rl4evit weights={policy}` in
  `benchmarks/results/rl4evit/sweep/results.json`; this file is a byte copy of that policy, sha256
  in `benchmarks/results/rl4evit/publish.txt`). Greedy decisions: on average it keeps {after}
  tokens (CLS included, of 65) after blocks 3, 6 and 9 (2,000 test images,
  `benchmarks/results/rl4evit/counts.txt`).
- Measured speed in that sweep (2-core VM, {sweep['threads']} threads, batch {sweep['batch_size']}):
  {row['speedup']:.2f}x the dense model's images/s; details in BENCHMARKS.md.
- Weights: fp32, {size:.1f} MB.
- Trained with alpha = {cfg['alpha']:g}, beta = {cfg['beta']:g} (the middle of three budgets; alpha chosen by
  the scan in BENCHMARKS.md), {run['steps']} PPO rollouts of {cfg['batch_size']} images from a class-balanced
  {cfg['limit_train']:,}-image subset of the CIFAR-10 training set, K = {ppo['epochs']} PPO iterations per
  rollout, Adam {ppo['lr_actor']:g} (actor) and {ppo['lr_critic']:g} (critic), clip {ppo['clip']:g},
  gamma {ppo['gamma']:g}, lambda {ppo['lam']:g}, 1 process with 2 threads, {last['elapsed_s'] / 60:.0f} min.
  Command (the scan's 30 steps, then resumed to {run['steps']} by the same command):

```
leanvit train-policy --model cifar10_vit12_w128 --data ../shared/data/cifar10-jpeg.tar.gz \\
    --threads 2 --opt agents=multi --alpha {alpha} --beta 1 --epochs 1 --batch-size 64 \\
    --limit-train 9600 --limit-eval 1000 --out runs/rl4evit/multi_a{alpha} --max-steps {run['steps']}
```

Shipped by `bash benchmarks/rl4evit_publish.sh` (run at the end of `benchmarks/rl4evit_reference.sh`).
"""
    CARD.write_text(card)
    print(card)


if __name__ == "__main__":
    main(sys.argv[1])
