#!/usr/bin/env bash
# DynamicViT at 0.5 and 0.7 of the dense GMACs on the reference model, 3 seeds (issue 19, point 4):
# the keep rate whose GMACs (predictors included) match the budget (`leanvit match --of-dense`), the
# predictors and the ViT fine-tuned with the recipe of benchmarks/archive/dynamicvit_reference.sh (held-out
# training images for the end-of-training check; the test set plays no part), then one `leanvit
# sweep --random-floor` on the 10,000 test images *against the original dense model*: the
# fine-tuned ViT dense (`none:checkpoint=`) and DynamicViT on it, with fidelity to the original
# model, and DynamicViT's floor (random tokens at its counts, on the fine-tuned ViT).
# Environment: SEEDS ["0 1 2"], BUDGETS ["0.5 0.7"], DATA, LOCK (a file: run each CPU step under
# flock LOCK), LIMIT_TRAIN [12800], LIMIT_TEST [all], RES [benchmarks/results/dynamicvit_v2],
# RUNS [runs/dynamicvit_v2] (smoke: LIMIT_TRAIN=256 LIMIT_TEST=250 RES=/tmp/r RUNS=/tmp/runs).
# Results: $RES/match_b<B>.json, $RES/b<B>_s<seed>/{train_metrics.json,sweep/}; runs in
# $RUNS/b<B>_s<seed>/ (resumable: re-running the script continues them).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
SEEDS="${SEEDS:-0 1 2}"
BUDGETS="${BUDGETS:-0.5 0.7}"
RES="${RES:-benchmarks/results/dynamicvit_v2}"
RUNS="${RUNS:-runs/dynamicvit_v2}"
LIMIT_TRAIN="${LIMIT_TRAIN:-12800}"
limit_test=(); [ -n "${LIMIT_TEST:-}" ] && limit_test=(--limit "$LIMIT_TEST")
run() { if [ -n "${LOCK:-}" ]; then flock "$LOCK" "$@"; else "$@"; fi; }
for budget in $BUDGETS; do
    mkdir -p "$RES"
    leanvit match --model cifar10_vit12_w128 --of-dense "$budget" --methods dynamicvit --threads 2 \
        --json "$RES/match_b$budget.json" < /dev/null
    rho=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['matched']['dynamicvit']['spec'].split('=')[1])" \
        "$RES/match_b$budget.json")
    for seed in $SEEDS; do
        name=b${budget}_s${seed}
        out=$RUNS/$name
        if [ ! -f "$out/final.safetensors" ]; then
            OMP_NUM_THREADS=1 run torchrun --standalone --nproc_per_node 2 -m leanvit train --model cifar10_vit12_w128 \
                --data "$DATA" --method dynamicvit --opt keep_rate="$rho" --distill 0.5 --epochs 2 --limit-train "$LIMIT_TRAIN" \
                --eval-split holdout --limit-eval 1000 --batch-size 128 --lr 1e-3 --min-lr 1e-5 --warmup-epochs 0 \
                --backbone-lr-scale 0.01 --freeze-backbone-epochs 0.33 --weight-decay 0.05 --label-smoothing 0.1 \
                --workers 1 --seed "$seed" --out "$out" < /dev/null
        fi
        mkdir -p "$RES/$name"
        cp "$out/metrics.json" "$RES/$name/train_metrics.json"
        run leanvit sweep --model cifar10_vit12_w128 --data "$DATA" --threads 2 --batch-size 250 --out "$RES/$name/sweep" \
            "${limit_test[@]}" --random-floor --methods "none:checkpoint=$out/final.safetensors" \
            "dynamicvit:keep_rate=$rho:weights=$out/method.safetensors:checkpoint=$out/final.safetensors" < /dev/null
    done
done
