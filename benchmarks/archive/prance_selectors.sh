#!/usr/bin/env bash
# PRANCE selectors for the reference meta-network (benchmarks/archive/prance_supernet.sh first): for each
# token strategy, and channel-only (strategy=none), one selector per GMACs budget (0.5 and 0.7 of
# dense), its reward's cost weight PI-controlled toward the budget during training. Each trains for
# 1 epoch on 6,400 training images (100 PPO batches of 64, K=4 as in the runs of
# 2026-12-02, pinned: the default is 10 since 2026-12-04, Result-to-Go rewards), and on, an
# epoch at a time up to 3, while its greedy GMACs ratio is not within 5% of the budget. That ratio is
# measured on the holdout: 1,000 class-balanced training images that are never trained on (eval
# transform), so the test set plays no part in the tuning.
# A selector still outside 5% after 3 epochs is calibrated on the same images (a bisected shift of
# its actions, see train_prance.py). Actor lr 1e-3 (the authors use 1e-4 for far longer trainings).
# 2 torchrun CPU processes. Re-running resumes (finished selectors are kept).
# Then every selector, the fixed sub-networks and the token-only methods on the same meta-network
# are evaluated on the 10,000 test images (benchmarks/results/prance_reference/).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
# the meta-network of benchmarks/archive/prance_supernet.sh if it is here, else the shipped one (its fp16 copy)
META="${META:-runs/prance-supernet/final.safetensors}"
if [[ -f "$META" ]]; then model=(--model cifar10_vit12_w128 --checkpoint "$META"); else model=(--model cifar10_vit12_w128_prance); fi
# CONFIGS="prune none" bash benchmarks/archive/prance_selectors.sh: only those
read -r -a CONFIGS <<< "${CONFIGS:-prune prune-merge merge none prune:channels=false}"
specs=()
for conf in "${CONFIGS[@]}"; do
    strategy="${conf%%:*}"
    opts=(--opt "strategy=$strategy")
    name="$strategy"
    if [[ "$conf" == *channels=false ]]; then opts+=(--opt channels=false); name="$strategy-tokens-only"; fi
    out="runs/prance-sel/$name"
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train-selector \
        "${model[@]}" --data "$DATA" "${opts[@]}" --out "$out" \
        --budget 0.5 0.7 --epochs 1 --max-epochs 3 --batch-size 64 --limit-train 6400 --limit-eval 1000 \
        --workers 1 --lr-actor 1e-3 --ppo-epochs 4
    for budget in 0.5 0.7; do
        spec="prance:strategy=$strategy:weights=$out/budget-$budget/selector.safetensors"
        [[ "$conf" == *channels=false ]] && spec="$spec:channels=false"
        specs+=("$spec")
    done
done
# RL4EViT's MAPPO policies, trained on the reference model (benchmarks/archive/rl4evit_reference.sh), as they are
if [[ -f benchmarks/results/rl4evit/alphas.txt ]]; then
    read -r -a alphas < benchmarks/results/rl4evit/alphas.txt
    for a in "${alphas[@]}"; do
        policy="runs/rl4evit/multi_a$a/policy.safetensors"
        [[ -f "$policy" ]] && specs+=("rl4evit:weights=$policy")
    done
fi
# the token-only methods run on the same meta-network, at about the same GMACs (0.5 and 0.7 of dense)
leanvit sweep "${model[@]}" --data "$DATA" --threads 2 \
    --out benchmarks/results/prance_reference --methods prance:subnet=middle prance:subnet=smallest \
    "${specs[@]}" tome:r=6 tome:r=3 evit:keep_rate=0.4 evit:keep_rate=0.7 \
    ppt:r=12:layers=1,3,5,7,9:threshold=scaled ppt:r=14:threshold=scaled random:keep_rate=0.5 random:keep_rate=0.7
