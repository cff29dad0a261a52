#!/usr/bin/env bash
# Trains the cluttered-CIFAR-10 reference model vit12_convstem_w128_cluttered from scratch, one epoch
# per call of `leanvit train` so that every epoch leaves a snapshot (the positive controls are checked
# on them while training goes on). 2 data-parallel CPU processes (torchrun, gloo), global batch 128,
# AdamW lr 2e-3, 1 warm-up epoch + cosine, label smoothing 0.1, crop+flip; 1,000 training images held
# out for the curve (never the test split). Re-running resumes (runs/<name>/last.pt); a session that
# ends mid-run commits `tools/checkpoint_pack.py pack runs/cluttered-w128 benchmarks/results/cluttered/resume`
# and the next one, on any machine, continues from it (unpacked first when there is no last.pt).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cluttered-w128}
EPOCHS=${EPOCHS:-15}
STEPS_PER_EPOCH=382  # (50,000 - 1,000 held out) / 2 processes // 64 per process
PACKED=${PACKED:-benchmarks/results/cluttered/resume}
mkdir -p "$OUT/snapshots"
# a new machine: the run continues from the committed pack (tools/checkpoint_pack.py)
if [ ! -f "$OUT/last.pt" ] && [ -f "$PACKED/state.json" ]; then
    python tools/checkpoint_pack.py unpack "$PACKED" "$OUT"
fi
done_steps() {
    [ -f "$OUT/last.pt" ] || { echo 0; return; }
    python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['step'])" "$OUT/last.pt"
}
for e in $(seq 1 "$EPOCHS"); do
    [ -f "$OUT/snapshots/epoch$e.safetensors" ] && continue
    # an epoch that ended on another machine left its snapshot there (its curve is in the history)
    [ "$(done_steps)" -gt $((e * STEPS_PER_EPOCH)) ] && continue
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train \
        --model vit12_convstem_w128_cluttered --data "${DATA:-cluttered:../shared/data/cifar10-jpeg.tar.gz}" \
        --out "$OUT" --epochs "$EPOCHS" --batch-size 128 --lr 2e-3 --warmup-epochs 1 \
        --weight-decay 0.05 --label-smoothing 0.1 --workers 1 --save-every 50 \
        --eval-split holdout --limit-eval 1000 --max-steps $((e * STEPS_PER_EPOCH))
    cp "$OUT/final.safetensors" "$OUT/snapshots/epoch$e.safetensors"
done
