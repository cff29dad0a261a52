#!/usr/bin/env bash
# PRANCE's selector for tokens alone (channels=false, strategy prune) on the reference meta-network,
# for budgets 0.5 and 0.7, trained exactly like the other selectors of benchmarks/prance_selectors.sh,
# then evaluated on the 10,000 test images into benchmarks/results/prance_reference_tokens_only/
# (the sweep of prance_selectors.sh is left as it is; its dense pass is the same meta-network).
# Run under the shared CPU lock: flock .cpu.lock bash benchmarks/prance_tokens_only.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
META=runs/prance-supernet/final.safetensors
out=runs/prance-sel/prune-tokens-only
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train-selector \
    --model cifar10_vit12_w128 --checkpoint "$META" --data "$DATA" --opt strategy=prune --opt channels=false --out "$out" \
    --budget 0.5 0.7 --epochs 1 --max-epochs 3 --batch-size 64 --limit-train 6400 --eval-split train --limit-eval 1000 \
    --workers 1 --lr-actor 1e-3
leanvit sweep --model cifar10_vit12_w128 --checkpoint "$META" --data "$DATA" --threads 2 \
    --out benchmarks/results/prance_reference_tokens_only --methods \
    prance:strategy=prune:channels=false:weights=$out/budget-0.5/selector.safetensors \
    prance:strategy=prune:channels=false:weights=$out/budget-0.7/selector.safetensors
