#!/usr/bin/env bash
# Ships the reference model trained by benchmarks/train_reference.sh: fp16 safetensors, JSON spec
# and model card in src/leanvit/zoo/, with the top-1 of the shipped fp16 weights measured on the
# 10,000 CIFAR-10 (JPEG) test images.
set -euo pipefail
cd "$(dirname "$0")/../.."
python - <<'PY'
import sys
sys.path.insert(0, "tools")  # tools/publish.py
from publish import publish
command = ("OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train \\\n"
           "    --model vit12_convstem_w128_cifar --data ../shared/data/cifar10-jpeg.tar.gz \\\n"
           "    --out runs/ref-w128 --epochs 15 --batch-size 128 --lr 2e-3 --warmup-epochs 1 \\\n"
           "    --weight-decay 0.05 --label-smoothing 0.1 --workers 1 --save-every 100")
print(publish("runs/ref-w128", "cifar10_vit12_w128", command=command))
PY
