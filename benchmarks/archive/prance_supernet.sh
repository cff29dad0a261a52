#!/usr/bin/env bash
# PRANCE meta-network for the reference model: heads and MLP neurons reordered by importance, then
# 2 epochs of weight-sharing fine-tuning (every step: the largest sub-network on the labels, the
# smallest and one random sub-network on its predictions), 2 torchrun CPU processes.
# Top-1 of the smallest, middle and largest sub-networks before (epoch 0) and after each epoch are
# in runs/prance-supernet/metrics.json. Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train-supernet \
    --model cifar10_vit12_w128 --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" --out runs/prance-supernet \
    --epochs 2 --batch-size 128 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 0.2 --weight-decay 0.05 \
    --label-smoothing 0.1 --sandwich 2 --workers 1 --save-every 50
