#!/usr/bin/env bash
# PRANCE selectors over seeds against random tokens at their own per-image counts (and widths), on
# the 10,000 test images. NET picks the network:
#   original: the *original* reference model cifar10_vit12_w128 with channels off (`channels=false`):
#             the selector picks only token keep ratios on a ViT never made channel-elastic, which
#             separates the meta-network's effect from the selector's (default STRATEGIES "prune");
#   meta:     the shipped meta-network cifar10_vit12_w128_prance, channels on (default STRATEGIES
#             "prune prune-merge merge none"), with its fixed sub-networks in the same sweep.
# For every strategy x seed: one selector per budget (0.5 and 0.7 of dense, selector included),
# trained as benchmarks/archive/prance_selectors.sh trains them (100 PPO batches of 64 from 6,400 training
# images, K=PPO_EPOCHS [10, the default; NET=original ran with 4 on 2026-12-04], actor lr 1e-3, the cost weight PI-controlled toward the budget, on an epoch at a time
# up to 3 while the greedy GMACs ratio on 1,000 held-out training images is more than 5% off, then
# calibration on those held-out images; the test set plays no part). Then one `leanvit sweep
# --random-floor` of all of them on the test images: fidelity to dense, and each selector against
# random tokens at its own per-image counts and widths. Re-running resumes (finished selectors are kept).
# FLOOR=shuffled adds the shuffled floor (`sweep --shuffled-floor`): each batch's per-image counts and widths
# dealt to its images in a random order, the control for which image gets which budget, and the only one
# of the channel-only selectors (strategy none), whose random floor is themselves.
# BASE [cifar10_vit12_w128] is the reference model (its meta-network is BASE_prance, or META_CKPT:
# the final.safetensors of a `leanvit train-supernet` run from BASE); the cluttered
# testbed: BASE=cluttered_cifar10_vit12_w128 DATA=cluttered:../shared/data/cifar10-jpeg.tar.gz with RES and RUNS.
# COST_WEIGHT replaces the budget by a fixed cost weight, as the authors train (no controller, no
# calibration): one selector per strategy x seed, trained for EPOCHS [3] epochs, wherever that
# reward puts its GMACs; TOKEN_WEIGHT [0.25] with it.
# Environment: NET [original], BASE, STRATEGIES, SEEDS ["0 1 2"], LIMIT_TRAIN [6400], PPO_EPOCHS [10], FLOOR [random], DATA,
# COST_WEIGHT, TOKEN_WEIGHT, EPOCHS; for a smoke run
# LIMIT_TEST (test images of the sweep, default all), RES and RUNS (where results and runs go).
# Results: benchmarks/results/prance_<NET>/{results.json,table.txt,...}, selectors and their metrics
# in runs/prance-<NET>/<strategy>_s<seed>/budget-<B>/.
# Run it under the shared CPU lock: flock .cpu.lock bash benchmarks/prance_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
NET="${NET:-original}"
ckpt=()
BASE="${BASE:-cifar10_vit12_w128}"
case "$NET" in
    original) model=$BASE; net_opts=(--opt channels=false); spec_opts=:channels=false
              fixed=(); default_strategies=prune ;;
    meta) model=${BASE}_prance; net_opts=(); spec_opts=
          # a meta-network not in the zoo: BASE's architecture with the weights of a train-supernet run
          [ -n "${META_CKPT:-}" ] && model=$BASE && ckpt=(--checkpoint "$META_CKPT")
          fixed=(prance:subnet=middle prance:subnet=smallest); default_strategies="prune prune-merge merge none" ;;
    *) echo "NET must be original or meta, got $NET" >&2; exit 2 ;;
esac
STRATEGIES="${STRATEGIES:-$default_strategies}"
SEEDS="${SEEDS:-0 1 2}"
LIMIT_TRAIN="${LIMIT_TRAIN:-6400}"
PPO_EPOCHS="${PPO_EPOCHS:-10}"
case "${FLOOR:-random}" in random) floor=--random-floor ;; shuffled) floor=--shuffled-floor ;;
    *) echo "FLOOR must be random or shuffled, got $FLOOR" >&2; exit 2 ;; esac
RES="${RES:-benchmarks/results/prance_$NET}"
RUNS="${RUNS:-runs/prance-$NET}"
if [ -n "${COST_WEIGHT:-}" ]; then
    train_opts=(--cost-weight "$COST_WEIGHT" --token-weight "${TOKEN_WEIGHT:-0.25}" --epochs "${EPOCHS:-3}")
    subs=(cost-$COST_WEIGHT); sub_out=/cost-$COST_WEIGHT  # out/cost-<W>/selector.safetensors
else  # out/budget-<B>/selector.safetensors
    train_opts=(--budget 0.5 0.7 --epochs 1 --max-epochs 3); subs=(budget-0.5 budget-0.7); sub_out=
fi
specs=()
for seed in $SEEDS; do  # seed-major: an interrupted run has every strategy at the first seeds
for strategy in $STRATEGIES; do
    out=$RUNS/${strategy}_s$seed
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train-selector \
        --model "$model" "${ckpt[@]}" --data "$DATA" --opt "strategy=$strategy" "${net_opts[@]}" --out "$out$sub_out" \
        "${train_opts[@]}" --batch-size 64 --limit-train "$LIMIT_TRAIN" --limit-eval 1000 \
        --workers 1 --lr-actor 1e-3 --ppo-epochs "$PPO_EPOCHS" --seed "$seed" < /dev/null
    for sub in "${subs[@]}"; do
        mkdir -p "$RES/${strategy}_s$seed/$sub"
        cp "$out/$sub/metrics.json" "$RES/${strategy}_s$seed/$sub/train_metrics.json"
        specs+=("prance:strategy=$strategy$spec_opts:weights=$out/$sub/selector.safetensors")
    done
done
done
leanvit sweep --model "$model" "${ckpt[@]}" --data "$DATA" --threads 2 --batch-size 250 --out "$RES" "$floor" \
    ${LIMIT_TEST:+--limit "$LIMIT_TEST"} --methods "${fixed[@]}" "${specs[@]}" < /dev/null
