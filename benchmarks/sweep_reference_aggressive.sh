#!/usr/bin/env bash
# The low-GMACs end of the reference-model sweep (sweep_reference.sh stops where most methods
# still lose < 1 point): more tokens removed per layer, or PPT at five layers instead of three.
# Writes benchmarks/results/sweep_reference_aggressive/.
set -euo pipefail
cd "$(dirname "$0")/.."
leanvit sweep --model cifar10_vit12_w128 --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" \
    --threads 2 --batch-size 250 --out benchmarks/results/sweep_reference_aggressive --methods \
    tome:r=6 tome:r=7 tome:r=8 \
    evit:keep_rate=0.4 evit:keep_rate=0.3 evit:keep_rate=0.2 \
    ppt:r=20:threshold=scaled ppt:r=24:threshold=scaled \
    ppt:r=10:layers=1,3,5,7,9:threshold=scaled ppt:r=12:layers=1,3,5,7,9:threshold=scaled \
    ppt:r=12:layers=1,3,5,7,9:threshold=0 ppt:r=12:layers=1,3,5,7,9:threshold=1 \
    random:keep_rate=0.4 random:keep_rate=0.3 random:keep_rate=0.2
