#!/usr/bin/env bash
# Trains a reference model from scratch: 2 data-parallel CPU processes (torchrun, gloo), 15 epochs,
# global batch 128, AdamW lr 2e-3, 1 warm-up epoch + cosine, label smoothing 0.1, crop+flip.
# Re-running resumes from runs/<name>/last.pt.
#   bash benchmarks/train_reference.sh            vit12_convstem_w128_cifar on CIFAR-10 (JPEG), runs/ref-w128
#   bash benchmarks/train_reference.sh cluttered  vit12_convstem_w128_cluttered on cluttered CIFAR-10,
#       runs/cluttered-w128: one `leanvit train` per epoch, so that every epoch leaves a snapshot in
#       snapshots/ (the positive controls are checked on them while training goes on); 1,000 training
#       images held out for the curve (never the test split). A session that ends mid-run commits
#       `python tools/checkpoint_pack.py pack runs/cluttered-w128 benchmarks/results/cluttered/resume`
#       and the next one, on any machine, continues from it (unpacked first when there is no last.pt).
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
COMMON=(--epochs 15 --batch-size 128 --lr 2e-3 --warmup-epochs 1 --weight-decay 0.05 --label-smoothing 0.1 --workers 1)
train() { OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train "${COMMON[@]}" "$@"; }

if [ "${1:-cifar10}" = cifar10 ]; then
    train --model vit12_convstem_w128_cifar --data "$CIFAR" --out runs/ref-w128 --save-every 100
    exit
fi
[ "$1" = cluttered ] || { echo "usage: bash benchmarks/train_reference.sh [cifar10|cluttered]" >&2; exit 2; }
OUT=${OUT:-runs/cluttered-w128}
STEPS_PER_EPOCH=382  # (50,000 - 1,000 held out) / 2 processes // 64 per process
PACKED=benchmarks/results/cluttered/resume
mkdir -p "$OUT/snapshots"
if [ ! -f "$OUT/last.pt" ] && [ -f "$PACKED/state.json" ]; then
    python tools/checkpoint_pack.py unpack "$PACKED" "$OUT"
fi
done_steps() {
    [ -f "$OUT/last.pt" ] || { echo 0; return; }
    python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['step'])" "$OUT/last.pt"
}
for e in $(seq 1 15); do
    [ -f "$OUT/snapshots/epoch$e.safetensors" ] && continue
    # an epoch that ended on another machine left its snapshot there (its curve is in the history)
    [ "$(done_steps)" -gt $((e * STEPS_PER_EPOCH)) ] && continue
    train --model vit12_convstem_w128_cluttered --data "cluttered:$CIFAR" --out "$OUT" --save-every 50 \
        --eval-split holdout --limit-eval 1000 --max-steps $((e * STEPS_PER_EPOCH))
    cp "$OUT/final.safetensors" "$OUT/snapshots/epoch$e.safetensors"
done
# ship it: fp16 weights, spec and model card in src/leanvit/zoo/, top-1 of the shipped file on the test split
python - "$OUT" "cluttered:$CIFAR" <<'PY'
import sys
sys.path.insert(0, "tools")
from publish import publish
command = ("for e in $(seq 1 15); do OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train \\\n"
           "    --model vit12_convstem_w128_cluttered --data cluttered:../shared/data/cifar10-jpeg.tar.gz \\\n"
           "    --out runs/cluttered-w128 --epochs 15 --batch-size 128 --lr 2e-3 --warmup-epochs 1 --weight-decay 0.05 \\\n"
           "    --label-smoothing 0.1 --workers 1 --save-every 50 --eval-split holdout --limit-eval 1000 \\\n"
           "    --max-steps $((e * 382)); done")
print(publish(sys.argv[1], "cluttered_cifar10_vit12_w128", command=command, data=sys.argv[2]))
PY
