#!/usr/bin/env bash
# Speed of per-image methods under packed execution, each against dense and its floor
# (random tokens at the same per-image counts and widths) in one run: 2 threads, median of 7 repeats
# (warm-up 2), a batch of 32 real test images, and the same images one at a time (batch 1).
#   1. the shipped PRANCE selector on its meta-network, and two fixed sub-networks;
#   2. the shipped RL4EViT policy, ATS, PPT and static methods at similar GMACs, reference model;
#   3. DeiT-S 224 (random weights) on Imagenette photos: ATS (layers 3-, tokens 0.5), ToMe, EViT,
#      and PRANCE's execution where MACs dominate: random per-image widths and keep ratios
#      (prance:random=true, no selector to train), widths only (strategy=none), and the fixed middle
#      sub-network (static widths) for comparison.
# RUNS="deit_s_b32 deit_s_b1": only those runs (default: all six); OUT: where the results go.
# Results: benchmarks/results/packed/*.json (tables: leanvit's bench format, in the .txt next to them).
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR="${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}"
IMAGENETTE="${IMAGENETTE:-../shared/data/imagenette-val-224.tar}"
OUT="${OUT:-benchmarks/results/packed}"
mkdir -p "$OUT"
RUNS="${RUNS:-prance_b32 prance_b1 reference_b32 reference_b1 deit_s_b32 deit_s_b1}"
run() {  # name, then bench arguments
    local name=$1; shift
    [[ " $RUNS " == *" $name "* ]] || return 0
    leanvit bench --threads 2 --repeats 11 --warmup 2 "$@" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
}
prance=(--model cifar10_vit12_w128_prance --data "$CIFAR" --split test
        --methods prance:weights=cifar10_vit12_w128_prance prance:subnet=middle prance:subnet=smallest)
reference=(--model cifar10_vit12_w128 --data "$CIFAR" --split test
           --methods rl4evit:weights=cifar10_vit12_w128 ats ats:tokens=0.5 ppt:r=10:threshold=scaled
                     tome:r=4 evit:keep_rate=0.5 random:keep_rate=0.5)
run prance_b32 "${prance[@]}" --batch-size 32
run prance_b1 "${prance[@]}" --batch-size 32 --one-at-a-time
run reference_b32 "${reference[@]}" --batch-size 32
run reference_b1 "${reference[@]}" --batch-size 32 --one-at-a-time
deit=(--model deit_small_patch16_224 --data "$IMAGENETTE" --num-classes 10
      --methods ats:tokens=0.5 tome:r=13 evit:keep_rate=0.7 prance:random=true prance:random=true:strategy=none
                prance:subnet=middle)
run deit_s_b32 "${deit[@]}" --batch-size 32
run deit_s_b1 "${deit[@]}" --batch-size 8 --one-at-a-time
