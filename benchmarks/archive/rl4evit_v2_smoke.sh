#!/usr/bin/env bash
# Smoke run of train-policy --budget 0.5 on the reference model (issue 19): 20 MAPPO batches of 64
# images (1,280 training images, 1 epoch), the default actor and the cheap one (hidden=[64]); alpha
# PI-controlled, then the keep logit calibrated on 500 held-out training images. Copies metrics.json,
# curves.png and train.log to benchmarks/results/rl4evit_v2/smoke/<actor>/. A few minutes per actor.
# Run it under the shared CPU lock: flock .cpu.lock bash benchmarks/archive/rl4evit_v2_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
for actor in default cheap; do
    extra=()
    [ $actor = cheap ] && extra=(--opt "hidden=[64]")
    leanvit train-policy --model cifar10_vit12_w128 --data "$DATA" --threads 2 "${extra[@]}" --budget 0.5 \
        --epochs 1 --batch-size 64 --limit-train 1280 --limit-eval 500 --workers 0 --out runs/smoke_$actor < /dev/null
    mkdir -p benchmarks/results/rl4evit_v2/smoke/$actor
    cp runs/smoke_$actor/metrics.json runs/smoke_$actor/curves.png runs/smoke_$actor/train.log \
        benchmarks/results/rl4evit_v2/smoke/$actor/
done
