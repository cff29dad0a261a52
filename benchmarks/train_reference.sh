#!/usr/bin/env bash
# Trains the reference model vit12_convstem_w128_cifar on CIFAR-10 (JPEG) from scratch:
# 2 data-parallel CPU processes (torchrun, gloo), 15 epochs, global batch 128, AdamW lr 2e-3,
# 1 warm-up epoch + cosine, label smoothing 0.1, crop+flip. Re-running resumes from runs/ref-w128/last.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train \
    --model vit12_convstem_w128_cifar --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" \
    --out runs/ref-w128 --epochs 15 --batch-size 128 --lr 2e-3 --warmup-epochs 1 \
    --weight-decay 0.05 --label-smoothing 0.1 --workers 1 --save-every 100
