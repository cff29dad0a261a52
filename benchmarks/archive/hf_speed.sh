#!/usr/bin/env bash
# ToMe (r=13) on a transformers DeiT-S (random weights, saved with save_pretrained, loaded through
# --model hf:) against the same method on timm's deit_small_patch16_224, batch 32, 2 threads:
# `leanvit bench` alternating between the two models ROUNDS times; compare the efficiency
# (speedup / GMACs ratio) medians. Raw: benchmarks/results/hf_speed/<model>_r<round>.json
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
RES=${RES:-benchmarks/results/hf_speed}
HF_DIR=${HF_DIR:-/tmp/hf-deit-s}
mkdir -p "$RES"
python - "$HF_DIR" <<'PY'
import sys, torch, transformers as T
torch.manual_seed(0)
T.DeiTForImageClassification(T.DeiTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
    intermediate_size=1536, image_size=224, patch_size=16, num_labels=1000)).save_pretrained(sys.argv[1])
PY
for r in $(seq 1 "$ROUNDS"); do
    for model in "hf:$HF_DIR" deit_small_patch16_224; do
        name=$([ "$model" = deit_small_patch16_224 ] && echo timm || echo hf)
        leanvit bench --model "$model" --methods tome:r=13 --batch-size 32 --threads 2 --repeats 5 \
            --json "$RES/${name}_r$r.json" --force < /dev/null
    done
done
