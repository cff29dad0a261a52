#!/usr/bin/env bash
# DynamicViT on the reference model at the keep rates of benchmarks/results/rl4evit/budgets.txt
# (those whose GMACs match each MAPPO policy; part of benchmarks/archive/rl4evit_reference.sh, runnable on
# its own): fine-tune the predictors and the ViT, then sweep the 10,000 CIFAR-10 test images.
# The authors' recipe scaled to this budget: predictors at the learning rate (1e-3, cosine to 1e-5),
# the ViT frozen for the first third of an epoch and then at 1% of it; keep-ratio loss, distillation
# 0.5 to the dense model; 2 epochs over a 12,800-image class-balanced train subset (200 steps of 128),
# 2 torchrun processes. LOCK=FILE runs each step under flock FILE (the shared CPU lock).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
RES=benchmarks/results/rl4evit
run() { if [ -n "${LOCK:-}" ]; then flock "$LOCK" "$@"; else "$@"; fi; }
while read -r run gmacs rho evit tome ppt; do
    OMP_NUM_THREADS=1 run torchrun --standalone --nproc_per_node 2 -m leanvit train --model cifar10_vit12_w128 \
        --data "$DATA" --method dynamicvit --opt keep_rate=$rho --distill 0.5 --epochs 2 --limit-train 12800 \
        --limit-eval 1000 --batch-size 128 --lr 1e-3 --min-lr 1e-5 --warmup-epochs 0 --backbone-lr-scale 0.01 \
        --freeze-backbone-epochs 0.33 --weight-decay 0.05 --label-smoothing 0.1 --workers 1 \
        --out runs/rl4evit/dynamicvit_k$rho < /dev/null
    run leanvit sweep --model vit12_convstem_w128_cifar --checkpoint runs/rl4evit/dynamicvit_k$rho/final.safetensors \
        --data "$DATA" --threads 2 --batch-size 250 --out $RES/dynamicvit_k$rho \
        --methods dynamicvit:keep_rate=$rho:weights=runs/rl4evit/dynamicvit_k$rho/method.safetensors < /dev/null
    cp runs/rl4evit/dynamicvit_k$rho/metrics.json $RES/dynamicvit_k$rho/train_metrics.json
done < $RES/budgets.txt
