#!/usr/bin/env bash
# Ship an RL4EViT policy for the reference model: among the MAPPO runs of benchmarks/rl4evit_v2.sh at
# one budget (default: the three seeds at 0.93 of dense, the cost of the policy shipped until 2026-12-06;
# cheap actor, input LayerNorm, r2 to the kept agents), the one closest to the dense model (lowest mean
# KL) on 2,000 class-balanced training images that none of them read (never the test set), copied to
# src/leanvit/zoo/cifar10_vit12_w128.rl4evit.safetensors with its model card (`publish_rl4evit` of `tools/publish.py`).
# It replaces the policy shipped on 2026-11-23 (its alpha chosen on test images; the file is kept as
# tests/data/rl4evit_legacy_policy.safetensors) only if it is better on the same held-out images: no
# further from dense at no more GMACs; otherwise the script stops and nothing is shipped.
# The choice is recorded in benchmarks/results/rl4evit_v2/shipped.json. Then the demo, which includes the
# shipped policy, is re-run into docs/demo.
# Environment: RUNS (the candidate result folders), DATA.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
RES=benchmarks/results/rl4evit_v2
RUNS="${RUNS:-$RES/multi_cheap-ln-kept_correct_b0.93_s0 $RES/multi_cheap-ln-kept_correct_b0.93_s1 $RES/multi_cheap-ln-kept_correct_b0.93_s2}"
python - "$DATA" $RUNS <<'PY'
import sys
sys.path.insert(0, "tools")  # tools/publish.py
from publish import publish_rl4evit
data, runs = sys.argv[1], sys.argv[2:]
# what the legacy policy read: 9,600 training images (seed 0); its evaluations were on test images
legacy = dict(data=data, train_split="train", eval_split="test", limit_train=9600, seed=0)
out = publish_rl4evit(runs, previous=("shipped 2026-11-23 (alpha chosen on test)", "tests/data/rl4evit_legacy_policy.safetensors",
                                      legacy), record="benchmarks/results/rl4evit_v2/shipped.json")
print("shipped", out["chosen"], out["sha256"])
PY
leanvit demo --data "$DATA" --threads 2 --out docs/demo < /dev/null
