#!/usr/bin/env bash
# RL4EViT with the paper's alternating epochs (issues 4 and 13), with the settings of issue 19:
# MAPPO with the defaults of `leanvit train-policy` (placement before blocks 3, 6, 9, input
# LayerNorm, r2 to kept agents), the cheap actor (hidden=[64]), alpha PI-controlled toward 0.7 of
# the dense GMACs. Epoch 1 trains the agents with the ViT frozen (90 PPO batches of 64 from 5,760
# class-balanced training images), epoch 2 fine-tunes the ViT under the frozen greedy agents (90
# steps, AdamW 1e-5, pruned tokens masked); the keep logit is calibrated on 1,000 held-out training
# images at the end. Then one sweep on the 10,000 test images, fidelity against the *original*
# dense model: the fine-tuned ViT alone, the agents on the original ViT and on the fine-tuned one,
# each against random tokens at its own per-image counts (the floor).
# Results: benchmarks/results/rl4evit_v2/finetune_b0.7_s0/{train_metrics.json,curves.png,sweep/}.
# Run under the shared CPU lock: flock .cpu.lock bash benchmarks/archive/rl4evit_finetune_v2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
SEED="${SEED:-0}"
name=finetune_b0.7_s$SEED
out=runs/rl4evit_v2/$name
RES=benchmarks/results/rl4evit_v2/$name
leanvit train-policy --model cifar10_vit12_w128 --data "$DATA" --threads 2 --opt "hidden=[64]" --budget 0.7 \
    --seed "$SEED" --epochs 2 --finetune-vit --batch-size 64 --limit-train 5760 --limit-eval 1000 --out "$out" < /dev/null
mkdir -p "$RES"
cp "$out/metrics.json" "$RES/train_metrics.json"
[ -f "$out/curves.png" ] && cp "$out/curves.png" "$RES/curves.png"
cp "$out/policy.safetensors" "$RES/policy.safetensors"
policy=rl4evit:weights=$out/policy.safetensors
leanvit sweep --model cifar10_vit12_w128 --data "$DATA" --threads 2 --batch-size 250 --out "$RES/sweep" --random-floor \
    --methods none "none:checkpoint=$out/vit.safetensors" "$policy" "$policy:checkpoint=$out/vit.safetensors" < /dev/null
