#!/usr/bin/env bash
# Measured speed of the PRANCE selectors (benchmarks/archive/prance_selectors.sh first) against their GMACs
# ratio, selector included, on the reference meta-network: the first 32 CIFAR-10 test images as
# one batch of 32, and the same 32 images one at a time (batch 1). 2 threads, median of 7 repeats.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
# the meta-network the selectors were trained on (as in prance_selectors.sh)
META="${META:-runs/prance-supernet/final.safetensors}"
if [[ -f "$META" ]]; then model=(--model cifar10_vit12_w128 --checkpoint "$META"); else model=(--model cifar10_vit12_w128_prance); fi
specs=(prance:subnet=middle prance:subnet=smallest)
for name in prune-merge prune merge none prune-tokens-only; do
    for budget in 0.5 0.7; do
        strategy="${name%-tokens-only}"
        weights="runs/prance-sel/$name/budget-$budget/selector.safetensors"
        [[ -f "$weights" ]] || { echo "skipping $name at budget $budget: no $weights"; continue; }
        spec="prance:strategy=$strategy:weights=$weights"
        [[ "$name" == *tokens-only ]] && spec="$spec:channels=false"
        specs+=("$spec")
    done
done
common=("${model[@]}" --data "$DATA" --split test
        --batch-size 32 --threads 2 --repeats 7 --warmup 2 --methods "${specs[@]}")
leanvit bench "${common[@]}" --json benchmarks/results/prance_speed_b32.json
leanvit bench "${common[@]}" --one-at-a-time --json benchmarks/results/prance_speed_b1.json
