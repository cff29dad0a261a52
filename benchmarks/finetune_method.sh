#!/usr/bin/env bash
# A method trained the way its paper trains it, at 0.5 and 0.7 of the dense GMACs, 3 seeds, then
# judged against random tokens at its own per-image counts:
#   METHOD=dynamicvit (default): the prediction modules and the ViT fine-tuned with distillation
#                     from the dense model (DynamicViT's recipe, scaled to this machine);
#   METHOD=evit:      the whole ViT fine-tuned with EViT's own reduction active (EViT's recipe).
# Per budget: the keep rate whose GMACs (predictors included) match it (`leanvit match --of-dense`);
# per seed: the training (held-out training images for the end-of-training check; the test set plays
# no part), then one `leanvit sweep --random-floor` on the test images *against the original dense
# model*: the fine-tuned ViT dense (`none:checkpoint=`), the method on it, and its floor (random
# tokens at its counts, on the fine-tuned ViT); with EVIT_OFF_THE_SHELF=1 also training-free EViT at
# the same keep rate on the original model, beside them.
# Environment: METHOD, MODEL [cifar10_vit12_w128], CKPT (weights of MODEL's architecture to start
# from, e.g. a snapshot of `train_reference.sh cluttered`), DATA, SEEDS ["0 1 2"], BUDGETS
# ["0.5 0.7"], LIMIT_TRAIN [12800], LIMIT_TEST [all], LOCK (a file: run each CPU step under flock),
# RES [benchmarks/results/<METHOD>_v2], RUNS [runs/<METHOD>_v2]
# (smoke: LIMIT_TRAIN=256 LIMIT_TEST=250 RES=/tmp/r RUNS=/tmp/runs SEEDS=0 BUDGETS=0.5).
# Results: $RES/match_b<B>.json, $RES/b<B>_s<seed>/{train_metrics.json,sweep/}; runs in
# $RUNS/b<B>_s<seed>/ (resumable: re-running the script continues them; a run already measured is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD="${METHOD:-dynamicvit}"
MODEL="${MODEL:-cifar10_vit12_w128}"
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
SEEDS="${SEEDS:-0 1 2}"
BUDGETS="${BUDGETS:-0.5 0.7}"
RES="${RES:-benchmarks/results/${METHOD}_v2}"
RUNS="${RUNS:-runs/${METHOD}_v2}"
LIMIT_TRAIN="${LIMIT_TRAIN:-12800}"
limit_test=(); [ -n "${LIMIT_TEST:-}" ] && limit_test=(--limit "$LIMIT_TEST")
start=(); [ -n "${CKPT:-}" ] && start=(--checkpoint "$CKPT")
case "$METHOD" in
    dynamicvit) recipe=(--distill 0.5 --lr 1e-3 --backbone-lr-scale 0.01 --freeze-backbone-epochs 0.33) ;;
    evit) recipe=(--lr 1e-4) ;;
    *) echo "METHOD must be dynamicvit or evit" >&2; exit 2 ;;
esac
run() { if [ -n "${LOCK:-}" ]; then flock "$LOCK" "$@"; else "$@"; fi; }
for budget in $BUDGETS; do
    mkdir -p "$RES"
    [ -f "$RES/match_b$budget.json" ] || leanvit match --model "$MODEL" "${start[@]}" --of-dense "$budget" \
        --methods "$METHOD" --threads 2 --json "$RES/match_b$budget.json" < /dev/null
    rho=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['matched'][sys.argv[2]]['spec'].split('=')[1])" \
        "$RES/match_b$budget.json" "$METHOD")
    for seed in $SEEDS; do
        name=b${budget}_s${seed}
        out=$RUNS/$name
        if [ ! -f "$out/final.safetensors" ]; then
            OMP_NUM_THREADS=1 run torchrun --standalone --nproc_per_node 2 -m leanvit train --model "$MODEL" "${start[@]}" \
                --data "$DATA" --method "$METHOD" --opt keep_rate="$rho" "${recipe[@]}" --epochs 2 \
                --limit-train "$LIMIT_TRAIN" --eval-split holdout --limit-eval 1000 --batch-size 128 --min-lr 1e-5 \
                --warmup-epochs 0 --weight-decay 0.05 --label-smoothing 0.1 --workers 1 --seed "$seed" --out "$out" < /dev/null
        fi
        [ -f "$RES/$name/sweep/results.json" ] && continue  # measured already
        mkdir -p "$RES/$name"
        cp "$out/metrics.json" "$RES/$name/train_metrics.json"
        weights=""; [ -f "$out/method.safetensors" ] && weights=":weights=$out/method.safetensors"
        methods=("none:checkpoint=$out/final.safetensors"
                 "$METHOD:keep_rate=$rho$weights:checkpoint=$out/final.safetensors")
        [ "${EVIT_OFF_THE_SHELF:-0}" = 1 ] && methods+=("evit:keep_rate=$rho")
        run leanvit sweep --model "$MODEL" "${start[@]}" --data "$DATA" --threads 2 --batch-size 250 \
            --out "$RES/$name/sweep" "${limit_test[@]}" --random-floor --methods "${methods[@]}" < /dev/null
    done
done
