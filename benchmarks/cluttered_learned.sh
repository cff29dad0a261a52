#!/usr/bin/env bash
# Every learned method on the cluttered testbed (cluttered_cifar10_vit12_w128, cluttered CIFAR-10
# from DATA's CIFAR-10), with the recipes the CIFAR-10 testbed's verdicts used, stage by stage:
#   controls    the positive controls first: DynamicViT (predictors and ViT, distillation) and EViT
#               fine-tuned under its own reduction, at 0.5 of dense, seed 0, with training-free EViT
#               beside them (finetune_method.sh); each against random tokens at its own counts;
#   fixed       the parameter-free rules (ToMe, EViT fused and not, PPT, ATS at the paper's stages and at one
#               layer, random) from about 0.4 to 0.75 of dense: the best fixed rule at a learned
#               method's GMACs, and the static methods' object recall beside the per-image methods'.
#   dynamicvit  DynamicViT, 3 seeds x 0.5 / 0.7;
#   evit        fine-tuned EViT, 3 seeds x 0.5 / 0.7;
#   mappo       RL4EViT, MAPPO with the authors' actor widths [4C, 256, 64] (rl4evit_v2.sh defaults);
#   mappo-cheap RL4EViT, MAPPO with the cheap actor (hidden=[64]) of the CIFAR-10 verdicts;
#   single      RL4EViT, single-agent PPO (cheap actor);
#   ship-rl4evit  ships the cluttered model's RL4EViT policy: of the mappo-cheap runs at 0.5 of dense (the
#               cheap actor, so that the policy runs faster than dense), the one closest to dense on
#               2,000 training images no run read (publish_rl4evit of tools/publish.py; the test set
#               plays no part); the choice in $RES/mappo-cheap/shipped.json;
#   supernet    PRANCE's meta-network from the cluttered model: heads and neurons reordered, 2 epochs
#               of weight sharing (the flags of benchmarks/archive/prance_supernet.sh);
#   prance      PRANCE selectors on that meta-network, strategies prune, merge and prune-merge, and
#               prune on the original model with channels off (prance_seeds.sh), one seed and sweep
#               at a time into prance_meta_s<seed>/ and prance_original_s<seed>/ (with the meta-network's
#               selectors for 0.5 of dense, the candidates of ship-prance);
#   prance-authors  a careful reproducer's try: the prance stage with the authors' fixed cost penalty in
#               place of the budget (no controller, no calibration; 3 epochs): their 0.008*10 per GMAC on
#               DeiT-S (4.6 GMACs) is 0.37 per unit of GMACs ratio, their 0.1 per kept ratio 0.27 of
#               that; into prance_authors_s<seed>/, where the reward puts each selector's GMACs;
#   ship-prance ships the meta-network and, of its selectors for 0.5 of dense (every strategy and
#               seed run so far), the one closest to dense on 2,000 training images no selector read
#               (publish_prance of tools/publish.py) as cluttered_cifar10_vit12_w128_prance; the
#               choice in $RES/prance_meta_shipped.json.
# Each stage resumes where it stopped (finished runs and measurements are skipped). Results go to
# benchmarks/results/cluttered/<stage>/, runs to runs/cluttered/<stage>/.
#   STAGES="controls" bash benchmarks/cluttered_learned.sh     (default: every stage, in this order)
# Environment: STAGES, SEEDS ["0 1 2"], CIFAR [../shared/data/cifar10-jpeg.tar.gz].
set -euo pipefail
cd "$(dirname "$0")/.."
export MODEL=cluttered_cifar10_vit12_w128 DATA="cluttered:${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}"
SEEDS="${SEEDS:-0 1 2}"
RES=benchmarks/results/cluttered
RUNS=runs/cluttered

finetune() {  # METHOD SEEDS BUDGETS [EVIT_OFF_THE_SHELF]
    METHOD=$1 SEEDS=$2 BUDGETS=$3 EVIT_OFF_THE_SHELF=${4:-0} RES=$RES/$1 RUNS=$RUNS/$1 \
        bash benchmarks/finetune_method.sh
}
rl4evit() {  # NAME AGENTS ACTOR
    AGENTS=$2 ACTOR=$3 SEEDS=$SEEDS RES=$RES/$1 RUNS=$RUNS/$1 bash benchmarks/rl4evit_v2.sh
}
for stage in ${STAGES:-controls fixed dynamicvit evit mappo mappo-cheap single ship-rl4evit supernet prance prance-authors ship-prance}; do
    echo "== $stage"
    case "$stage" in
        controls) finetune dynamicvit 0 0.5; finetune evit 0 0.5 1 ;;
        fixed)
            [ -f "$RES/fixed/results.json" ] || leanvit sweep --model "$MODEL" --data "$DATA" --threads 2 --batch-size 250 \
                --out "$RES/fixed" --methods tome:r={3,5,6} evit:keep_rate=0.{7,5,4} evit:keep_rate=0.{7,5,4}:fuse=false \
                ppt:r={14,24}:threshold=scaled ppt:r=12:layers=1,3,5,7,9:threshold=scaled \
                ats:tokens=1.0 ats:tokens=1.0:layers={4,7} random:keep_rate=0.{7,5} < /dev/null ;;
        dynamicvit) finetune dynamicvit "$SEEDS" "0.5 0.7" ;;
        evit) finetune evit "$SEEDS" "0.5 0.7" 1 ;;
        mappo) rl4evit mappo multi default ;;
        mappo-cheap) rl4evit mappo-cheap multi cheap ;;
        single) rl4evit single single cheap ;;
        ship-rl4evit)
            python - "$RES/mappo-cheap" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tools")  # tools/publish.py
from publish import publish_rl4evit
res = Path(sys.argv[1])
runs = sorted(str(p.parent.parent) for p in res.glob("multi_cheap-ln-kept_correct_b0.5_s*/sweep/results.json"))
out = publish_rl4evit(runs, name="cluttered_cifar10_vit12_w128", record=str(res / "shipped.json"),
                      shipped_by="STAGES=ship-rl4evit bash benchmarks/cluttered_learned.sh")
print("shipped", out["chosen"], out["sha256"])
PY
            ;;
        supernet)  # a session that ends mid-run commits its state (tools/checkpoint_pack.py pack
            # runs/cluttered/supernet benchmarks/results/cluttered/supernet/resume); any machine resumes from it
            [ -f "$RUNS/supernet/last.pt" ] || [ ! -f "$RES/supernet/resume/state.json" ] ||
                python tools/checkpoint_pack.py unpack "$RES/supernet/resume" "$RUNS/supernet"
            [ -f "$RUNS/supernet/final.safetensors" ] || OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m leanvit train-supernet \
                --model "$MODEL" --data "$DATA" --out "$RUNS/supernet" \
                --epochs 2 --batch-size 128 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 0.2 --weight-decay 0.05 \
                --label-smoothing 0.1 --sandwich 2 --workers 1 --save-every 50 < /dev/null
            mkdir -p "$RES/supernet" && cp "$RUNS/supernet/metrics.json" "$RES/supernet/train_metrics.json"
            # the meta-network itself (fp32, about 10 MB), so that `prance` runs on any machine
            cp "$RUNS/supernet/final.safetensors" "$RES/supernet/final.safetensors" ;;
        prance)  # one sweep per seed, so that each finished seed can be committed before a session ends
            for seed in $SEEDS; do
                [ -f "$RES/prance_meta_s$seed/results.json" ] || NET=meta BASE=$MODEL \
                    META_CKPT=$RES/supernet/final.safetensors STRATEGIES="prune merge prune-merge" \
                    SEEDS=$seed RES=$RES/prance_meta_s$seed RUNS=$RUNS/prance_meta bash benchmarks/prance_seeds.sh
                for run in "$RUNS"/prance_meta/*_s"$seed"/budget-0.5; do  # ship-prance's candidates, on any machine
                    cp "$run/selector.safetensors" "$RES/prance_meta_s$seed/$(basename "$(dirname "$run")")/budget-0.5/"
                done
            done
            for seed in $SEEDS; do
                [ -f "$RES/prance_original_s$seed/results.json" ] || NET=original BASE=$MODEL SEEDS=$seed \
                    RES=$RES/prance_original_s$seed RUNS=$RUNS/prance_original bash benchmarks/prance_seeds.sh
            done ;;
        prance-authors)
            for seed in $SEEDS; do
                [ -f "$RES/prance_authors_s$seed/results.json" ] || NET=meta BASE=$MODEL \
                    META_CKPT=$RES/supernet/final.safetensors STRATEGIES="prune merge prune-merge" \
                    COST_WEIGHT=0.37 TOKEN_WEIGHT=0.27 EPOCHS=3 SEEDS=$seed RES=$RES/prance_authors_s$seed \
                    RUNS=$RUNS/prance_authors bash benchmarks/prance_seeds.sh
            done ;;
        ship-prance)
            python - "$RES" "$DATA" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tools")  # tools/publish.py
from publish import publish_prance
res, data = Path(sys.argv[1]), sys.argv[2]
candidates = sorted(str(p.parent) for p in res.glob("prance_meta_s*/*/budget-0.5/selector.safetensors"))
out = publish_prance(str(res / "supernet"), candidates, data, name="cluttered_cifar10_vit12_w128_prance",
                     base="cluttered_cifar10_vit12_w128", record=str(res / "prance_meta_shipped.json"),
                     shipped_by="STAGES=ship-prance bash benchmarks/cluttered_learned.sh")
print("shipped", out["chosen"], out["sha256"])
PY
            ;;
        *) echo "unknown stage $stage (controls fixed dynamicvit evit mappo mappo-cheap single ship-rl4evit supernet prance prance-authors ship-prance)" >&2; exit 2 ;;
    esac
done
