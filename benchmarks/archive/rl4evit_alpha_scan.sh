#!/usr/bin/env bash
# RL4EViT on the reference model: which way does alpha (beta = 1) move the kept tokens?
# The first STEPS (default 30) steps of MAPPO training at the paper's alpha/beta (0.80, 0.72, 0.56)
# and at smaller ones; greedy top-1 and GMACs on a class-balanced 1,000-image test subset after
# those steps (in runs/rl4evit/<agents>_a<alpha>/metrics.json). Same configuration as
# rl4evit_reference.sh, so those runs resume from these ones (max-steps may change on resume).
# Usage: bash benchmarks/archive/rl4evit_alpha_scan.sh [multi|single]
set -euo pipefail
cd "$(dirname "$0")/../.."
# the published numbers (BENCHMARKS.md, 2026-11-23) were trained with the settings before issue 19:
# pruning after blocks 3, 6, 9, ReLU MLPs, PyTorch's init, no entropy bonus, no value normalisation,
# no input LayerNorm, r2 paid to pruned agents too
LEGACY="--opt placement=after --opt activation=relu --opt input_norm=false --init default --entropy-coef 0 --no-value-norm --r2-to alive"
agents=${1:-multi}
for alpha in ${ALPHAS:-0.8 0.72 0.56 0.3 0.1 0.03}; do
    leanvit train-policy --model cifar10_vit12_w128 --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" \
        --threads 2 --opt agents=$agents $LEGACY --alpha $alpha --beta 1 --epochs 1 --batch-size 64 \
        --limit-train 9600 --limit-eval 1000 --out runs/rl4evit/${agents}_a$alpha --max-steps ${STEPS:-30}
done
