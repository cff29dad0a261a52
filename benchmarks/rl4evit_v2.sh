#!/usr/bin/env bash
# RL4EViT v2 on a reference model (MODEL, default cifar10_vit12_w128): MAPPO with the paper's placement
# (before blocks 3, 6, 9) and MAPPO's settings (entropy 0.01, value normalisation, tanh, orthogonal
# init), alpha PI-controlled toward each budget (actor MACs included), then the keep logit calibrated
# on 1,000 held-out training images (never trained on). For every seed x budget x agent kind:
#   1. train-policy --budget B (resumable: re-running the script continues every run where it stopped);
#   2. `leanvit match` of the policy on 2,000 test images: its mean GMACs, tokens per block and the
#      random:schedule spec at those counts (the control for its per-image choice);
#   3. `leanvit sweep --random-floor` on the 10,000 test images: dense, the policy and random at its
#      mean counts, with fidelity to dense (agreement, KL) in results.json, and for the policy its
#      random floor: random tokens at its own per-image counts on the same images, with the paired
#      differences policy - floor (KL, agreement, top-1) and their 95% intervals.
# Environment (defaults in brackets):
#   SEEDS ["0 1 2"], BUDGETS ["0.5 0.7"] (fractions of the dense GMACs), REWARD [correct]
#   (correct | agreement | kl), ACTOR [default] (default: hidden [4C, 256, 64] = 512-256-64;
#   cheap: hidden=[64], about a twentieth of the default actor's MACs), INPUT_NORM [true] (a
#   LayerNorm of the actor's and critic's input, MAPPO's feature normalisation; runs with it are
#   named <actor>-ln; false: as the runs of 2026-12-02/03), R2_TO [kept] (who earns r2: the agents
#   that kept their token, the paper's, named -kept; alive: every agent that acted, as the runs of
#   2026-12-02/03), AGENTS [multi] (multi | single, or both), EPOCHS [4] (epochs over LIMIT_TRAIN
#   [9600] images, batch 64), DATA, MODEL [cifar10_vit12_w128; the cluttered testbed:
#   MODEL=cluttered_cifar10_vit12_w128 DATA=cluttered:../shared/data/cifar10-jpeg.tar.gz
#   RES=benchmarks/results/cluttered/rl4evit RUNS=runs/cluttered/rl4evit], RES, RUNS.
# Results: $RES [benchmarks/results/rl4evit_v2]/<agents>_<actor>[-ln][-kept]_<reward>_b<B>_s<seed>/{match.json,sweep/};
# runs in $RUNS [runs/rl4evit_v2]/<same name>/ (metrics.json with the per-batch curve, curves.png).
# Run it under the shared CPU lock: flock .cpu.lock bash benchmarks/rl4evit_v2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
MODEL="${MODEL:-cifar10_vit12_w128}"
SEEDS="${SEEDS:-0 1 2}"
BUDGETS="${BUDGETS:-0.5 0.7}"
REWARD="${REWARD:-correct}"
ACTOR="${ACTOR:-default}"
AGENTS="${AGENTS:-multi}"
INPUT_NORM="${INPUT_NORM:-true}"
case "$INPUT_NORM" in true) ln=-ln ;; false) ln= ;; *) echo "INPUT_NORM must be true or false" >&2; exit 2 ;; esac
R2_TO="${R2_TO:-kept}"
case "$R2_TO" in kept) ln=$ln-kept ;; alive) ;; *) echo "R2_TO must be kept or alive" >&2; exit 2 ;; esac
EPOCHS="${EPOCHS:-4}"
LIMIT_TRAIN="${LIMIT_TRAIN:-9600}"
case "$ACTOR" in
    default) actor_opts=() ;;
    cheap) actor_opts=(--opt "hidden=[64]") ;;
    *) echo "ACTOR must be default or cheap, got $ACTOR" >&2; exit 2 ;;
esac
RES="${RES:-benchmarks/results/rl4evit_v2}"
RUNS="${RUNS:-runs/rl4evit_v2}"
mkdir -p "$RES"
for agents in $AGENTS; do
for budget in $BUDGETS; do
for seed in $SEEDS; do
    name=${agents}_${ACTOR}${ln}_${REWARD}_b${budget}_s${seed}
    out=$RUNS/$name
    [ -f "$RES/$name/sweep/results.json" ] && continue  # measured already
    leanvit train-policy --model "$MODEL" --data "$DATA" --threads 2 --opt agents=$agents \
        --opt input_norm=$INPUT_NORM "${actor_opts[@]}" --budget "$budget" --reward "$REWARD" --r2-to "$R2_TO" --seed "$seed" --epochs "$EPOCHS" \
        --batch-size 64 --limit-train "$LIMIT_TRAIN" --limit-eval 1000 --out "$out" < /dev/null
    mkdir -p "$RES/$name"
    cp "$out/metrics.json" "$RES/$name/train_metrics.json"
    [ -f "$out/curves.png" ] && cp "$out/curves.png" "$RES/$name/curves.png"
    cp "$out/policy.safetensors" "$RES/$name/policy.safetensors"  # about 100 KB with the cheap actor
    policy=rl4evit:weights=$out/policy.safetensors
    leanvit match --model "$MODEL" --method "$policy" --data "$DATA" --limit 2000 --threads 2 \
        --methods evit tome ppt --json "$RES/$name/match.json" < /dev/null
    random=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['random_control'])" "$RES/$name/match.json")
    leanvit sweep --model "$MODEL" --data "$DATA" --threads 2 --batch-size 250 --out "$RES/$name/sweep" \
        --methods none "$policy" "$random" --random-floor < /dev/null
done
done
done
