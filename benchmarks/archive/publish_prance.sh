#!/usr/bin/env bash
# Ship the PRANCE meta-network (runs/prance-supernet, from benchmarks/archive/prance_supernet.sh) and one
# selector (from benchmarks/archive/prance_selectors.sh) for the reference model, with their model card:
#   bash benchmarks/archive/publish_prance.sh runs/prance-sel/prune/budget-0.5 prune
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import sys; sys.path.insert(0, 'tools'); from publish import publish_prance; print(publish_prance(*sys.argv[1:]))" \
    "${META:-runs/prance-supernet}" "$1" "$2" "${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
