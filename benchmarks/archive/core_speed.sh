#!/usr/bin/env bash
# Throughput of dense DeiT-S vs each parameter-free method: batch 32, 224x224, 2 CPU threads,
# median of 7 timed repeats after 2 warm-up rounds, on the first 32 Imagenette validation photos.
# Writes benchmarks/results/core_speed.json; BENCHMARKS.md quotes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/imagenette-val-224.tar}"
python -m leanvit bench --model deit_small_patch16_224 \
    --methods tome:r=13 evit:keep_rate=0.7 ppt:r=50 ppt:r=50:threshold=2e-5 ats random:keep_rate=0.7 \
    --batch-size 32 --threads 2 --repeats 7 --warmup 2 --data "$DATA" \
    --json benchmarks/results/core_speed.json 2> benchmarks/results/core_speed.log
