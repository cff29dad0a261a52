#!/usr/bin/env bash
# Accuracy-GMACs sweep of every parameter-free method on the reference model, on the 10,000
# CIFAR-10 (JPEG) test images, one `leanvit sweep` per range:
#   bash benchmarks/sweep_reference.sh            curves for ToMe, EViT, PPT (scaled threshold), ATS,
#                                                 random, and a PPT threshold sweep at r=10 and r=14
#                                                 (0 = always prune, 1 = always pool);
#                                                 writes benchmarks/results/sweep_reference/
#   bash benchmarks/sweep_reference.sh aggressive the low-GMACs end, where the default range stops
#                                                 (most methods there still lose < 1 point): more
#                                                 tokens removed per layer, or PPT at five layers;
#                                                 writes benchmarks/results/sweep_reference_aggressive/
# Each folder gets results.json, pareto.png, token_maps.png and table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
RANGE=${1:-default}
if [ "$RANGE" = default ]; then
    OUT=benchmarks/results/sweep_reference
    methods=(tome:r={1,2,3,4,5} evit:keep_rate=0.{9,8,7,6,5} ppt:r={4,6,8,10,12,14,16}:threshold=scaled)
    for r in 10 14; do
        for tau in 0 1e-4 3e-4 1.3e-3 3e-3 1; do methods+=("ppt:r=$r:threshold=$tau"); done
    done
    methods+=(ats:tokens={1.0,0.7,0.5} random:keep_rate=0.{9,8,7,6,5})
elif [ "$RANGE" = aggressive ]; then
    OUT=benchmarks/results/sweep_reference_aggressive
    methods=(tome:r={6,7,8} evit:keep_rate=0.{4,3,2} ppt:r={20,24}:threshold=scaled
             ppt:r={10,12}:layers=1,3,5,7,9:threshold=scaled ppt:r=12:layers=1,3,5,7,9:threshold={0,1}
             random:keep_rate=0.{4,3,2})
else
    echo "usage: bash benchmarks/sweep_reference.sh [default|aggressive]" >&2
    exit 2
fi
leanvit sweep --model cifar10_vit12_w128 --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" \
    --threads 2 --batch-size 250 --out "$OUT" --methods "${methods[@]}"
