#!/usr/bin/env bash
# PRANCE with channels off on the *original* reference model cifar10_vit12_w128 (issue 19, point 3):
# the selector picks only token keep ratios, on the ViT that was never made channel-elastic, so the
# meta-network's effect is separated from the selector's. For every strategy x seed: one selector
# per budget (0.5 and 0.7 of dense, selector included), trained as benchmarks/prance_selectors.sh
# trains the meta-network's (100 PPO batches of 64 from 6,400 training images, K=4, actor lr 1e-3,
# the cost weight PI-controlled toward the budget, on an epoch at a time up to 3 while the greedy
# GMACs ratio on 1,000 held-out training images is more than 5% off, then calibration on those
# held-out images; the test set plays no part). Then one `leanvit sweep --random-floor` of all of
# them on the 10,000 test images: fidelity to dense, and each selector against random tokens at its
# own per-image counts. Re-running resumes (finished selectors are kept).
# Environment: STRATEGIES ["prune"], SEEDS ["0 1 2"], LIMIT_TRAIN [6400], DATA; for a smoke run
# LIMIT_TEST (test images of the sweep, default all), RES and RUNS (where results and runs go).
# Results: benchmarks/results/prance_original/{results.json,table.txt,...}, selectors and their
# metrics in runs/prance-original/<strategy>_s<seed>/budget-<B>/.
# Run it under the shared CPU lock: flock .cpu.lock bash benchmarks/prance_original.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
STRATEGIES="${STRATEGIES:-prune}"
SEEDS="${SEEDS:-0 1 2}"
LIMIT_TRAIN="${LIMIT_TRAIN:-6400}"
RES="${RES:-benchmarks/results/prance_original}"
RUNS="${RUNS:-runs/prance-original}"
specs=()
for strategy in $STRATEGIES; do
for seed in $SEEDS; do
    out=$RUNS/${strategy}_s$seed
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train-selector \
        --model cifar10_vit12_w128 --data "$DATA" --opt "strategy=$strategy" --opt channels=false --out "$out" \
        --budget 0.5 0.7 --epochs 1 --max-epochs 3 --batch-size 64 --limit-train "$LIMIT_TRAIN" --limit-eval 1000 \
        --workers 1 --lr-actor 1e-3 --seed "$seed" < /dev/null
    for budget in 0.5 0.7; do
        mkdir -p "$RES/${strategy}_s$seed/budget-$budget"
        cp "$out/budget-$budget/metrics.json" "$RES/${strategy}_s$seed/budget-$budget/train_metrics.json"
        specs+=("prance:strategy=$strategy:channels=false:weights=$out/budget-$budget/selector.safetensors")
    done
done
done
leanvit sweep --model cifar10_vit12_w128 --data "$DATA" --threads 2 --batch-size 250 --out "$RES" --random-floor \
    ${LIMIT_TEST:+--limit "$LIMIT_TEST"} --methods "${specs[@]}" < /dev/null
