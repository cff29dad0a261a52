#!/usr/bin/env bash
# Ship the MAPPO policy of the middle budget (second alpha of benchmarks/results/rl4evit/alphas.txt)
# as src/leanvit/zoo/cifar10_vit12_w128.rl4evit.safetensors (fp32, loadable with
# weights="cifar10_vit12_w128") and write its model card; then re-run the demo, which includes it,
# into docs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a alphas < benchmarks/results/rl4evit/alphas.txt
src=runs/rl4evit/multi_a${alphas[1]}/policy.safetensors
cp "$src" src/leanvit/zoo/cifar10_vit12_w128.rl4evit.safetensors
sha256sum "$src" src/leanvit/zoo/cifar10_vit12_w128.rl4evit.safetensors
python -c "import sys; from leanvit.publish import publish_rl4evit; publish_rl4evit(sys.argv[1])" "${alphas[1]}"
leanvit demo --data "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" --threads 2 --out docs/demo < /dev/null
