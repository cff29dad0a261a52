#!/usr/bin/env bash
# Full accuracy-GMACs sweep of every parameter-free method on the reference model, on the 10,000
# CIFAR-10 (JPEG) test images: curves for ToMe, EViT, PPT (scaled threshold), ATS, random, and a
# PPT threshold sweep at r=10 and r=14 (0 = always prune, 1 = always pool).
# Writes benchmarks/results/sweep_reference/{results.json,pareto.png,token_maps.png,table.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
ppt_tau=()
for r in 10 14; do
    for tau in 0 1e-4 3e-4 1.3e-3 3e-3 1; do ppt_tau+=("ppt:r=$r:threshold=$tau"); done
done
leanvit sweep --model cifar10_vit12_w128 --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" \
    --threads 2 --batch-size 250 --out benchmarks/results/sweep_reference --methods \
    tome:r=1 tome:r=2 tome:r=3 tome:r=4 tome:r=5 \
    evit:keep_rate=0.9 evit:keep_rate=0.8 evit:keep_rate=0.7 evit:keep_rate=0.6 evit:keep_rate=0.5 \
    ppt:r=4:threshold=scaled ppt:r=6:threshold=scaled ppt:r=8:threshold=scaled \
    ppt:r=10:threshold=scaled ppt:r=12:threshold=scaled ppt:r=14:threshold=scaled ppt:r=16:threshold=scaled \
    "${ppt_tau[@]}" \
    ats:tokens=1.0 ats:tokens=0.7 ats:tokens=0.5 \
    random:keep_rate=0.9 random:keep_rate=0.8 random:keep_rate=0.7 random:keep_rate=0.6 random:keep_rate=0.5
