#!/usr/bin/env bash
# Ship the PRANCE meta-network (runs/prance-supernet, from benchmarks/archive/prance_supernet.sh) and, of
# the given selectors (from benchmarks/archive/prance_selectors.sh), the one closest to dense on training
# images no selector read, with their model card (`publish_prance` of tools/publish.py):
#   bash benchmarks/archive/publish_prance.sh runs/prance-sel/prune/budget-0.5 [more selector folders]
set -euo pipefail
cd "$(dirname "$0")/../.."
python - "${META:-runs/prance-supernet}" "${DATA:-../shared/data/cifar10-jpeg.tar.gz}" "$@" <<'PY'
import sys
sys.path.insert(0, "tools")  # tools/publish.py
from publish import publish_prance
meta, data, candidates = sys.argv[1], sys.argv[2], sys.argv[3:]
print(publish_prance(meta, candidates, data, record="benchmarks/results/prance_reference/shipped_choice.json",
                     shipped_by="bash benchmarks/archive/publish_prance.sh " + " ".join(candidates)))
PY
