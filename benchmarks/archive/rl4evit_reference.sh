#!/usr/bin/env bash
# RL4EViT (issue 4) on the reference model cifar10_vit12_w128, end to end: Tables I and II of
# BENCHMARKS.md. Every step resumes or is cheap to repeat; re-running the script picks up where it
# stopped. Run it under the shared CPU lock: flock .cpu.lock bash benchmarks/archive/rl4evit_reference.sh
# It reproduces the published numbers: its trainings (rl4evit_alpha_scan.sh) pin the settings of
# then (placement=after, relu, default init, no entropy bonus or value normalisation, no input
# LayerNorm, r2 to every agent that acted); the policies
# they write carry placement=after in their metadata. The paper-faithful recipe is rl4evit_v2.sh.
#  1. alpha scan: 30 MAPPO steps at alpha in {0.8, 0.72, 0.56 (the paper's), 0.3, 0.1, 0.07, 0.05,
#     0.04, 0.03}, beta = 1 (rl4evit_alpha_scan.sh); the alphas nearest 0.75, 0.65, 0.55 of the
#     dense GMACs (greedy, 1,000 test images) are the three budgets (rl4evit_alphas.py).
#     The single-agent ablation collapses at those alphas, so it has its own scan at smaller ones
#     (0.04 down to 0.001) and its own three alphas for the same targets.
#  2. MAPPO (agents=multi) and the single-agent PPO ablation (agents=single) at their alphas:
#     90 steps of 64 images (the runs of step 1 continue), ViT frozen, paper PPO defaults
#     (K = 15, Adam 5e-5, clip 0.2, gamma 0.99, lambda 0.95), 1 process, 2 threads.
#  3. `leanvit match` of each MAPPO policy on 2,000 test images: its mean GMACs and tokens per block,
#     the random:schedule spec at those counts, and the EViT/ToMe/PPT/DynamicViT settings whose GMACs
#     are closest (their counts do not depend on the image); budgets.txt and counts.txt from it.
#     DynamicViT fine-tuned and swept at the keep rate whose GMACs match each MAPPO policy
#     (benchmarks/archive/dynamicvit_reference.sh; until 2026-12-02: 1 epoch, AdamW 1e-4 for all weights).
#  4. Random at MAPPO's mean token counts per block (from step 3).
#  5. Everything on the 10,000 CIFAR-10 test images (leanvit sweep, 2 threads, batch 250): EViT,
#     ToMe and PPT (threshold=scaled) at the settings whose GMACs match each budget, both
#     policies, the random controls; DynamicViT with its own fine-tuned ViT.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
RES=benchmarks/results/rl4evit
mkdir -p $RES
STEPS=30 ALPHAS="0.8 0.72 0.56 0.3 0.1 0.07 0.05 0.04 0.03" bash benchmarks/archive/rl4evit_alpha_scan.sh multi
python benchmarks/archive/rl4evit_alphas.py multi > $RES/alphas.txt
read -r -a alphas < $RES/alphas.txt
STEPS=30 ALPHAS="0.04 0.02 0.01 0.005 0.002 0.001" bash benchmarks/archive/rl4evit_alpha_scan.sh single
python benchmarks/archive/rl4evit_alphas.py single > $RES/single_alphas.txt
read -r -a single_alphas < $RES/single_alphas.txt
echo "alphas for the three budgets: MAPPO ${alphas[*]}, single-agent ${single_alphas[*]}"
ALPHAS="${alphas[*]}" STEPS=90 bash benchmarks/archive/rl4evit_alpha_scan.sh multi
ALPHAS="${single_alphas[*]}" STEPS=90 bash benchmarks/archive/rl4evit_alpha_scan.sh single
: > $RES/budgets.txt
: > $RES/counts.txt
for a in "${alphas[@]}"; do
    policy=runs/rl4evit/multi_a$a/policy.safetensors
    leanvit match --model cifar10_vit12_w128 --method rl4evit:weights=$policy --data "$DATA" --limit 2000 \
        --threads 2 --methods dynamicvit evit tome ppt --json $RES/match_a$a.json
    python - $RES $a <<'PY'  # one line each in the formats of budgets.txt and counts.txt
import json, sys
res, a = sys.argv[1:]
m = json.load(open(f"{res}/match_a{a}.json"))
s = {k: v["spec"] for k, v in m["matched"].items()}
with open(f"{res}/budgets.txt", "a") as f:
    print(f"runs/rl4evit/multi_a{a} {m['gmacs']:.5f}", s["dynamicvit"].split("=")[1], s["evit"], s["tome"], s["ppt"], file=f)
with open(f"{res}/counts.txt", "a") as f:
    counts = " ".join(f"{c:.1f}" for c in m["mean_tokens"])
    print(f"runs/rl4evit/multi_a{a}/policy.safetensors: mean tokens per block ({m['n_images']} images): {counts}",
          m["random_control"], sep="\n", file=f)
PY
done
cat $RES/budgets.txt
cat $RES/counts.txt
specs=()
while read -r run gmacs rho evit tome ppt; do specs+=("$evit" "$tome" "$ppt"); done < $RES/budgets.txt
for a in "${alphas[@]}"; do specs+=("rl4evit:weights=runs/rl4evit/multi_a$a/policy.safetensors"); done
for a in "${single_alphas[@]}"; do specs+=("rl4evit:weights=runs/rl4evit/single_a$a/policy.safetensors"); done
specs+=($(grep '^random:schedule=' $RES/counts.txt))
mapfile -t specs < <(printf '%s\n' "${specs[@]}" | awk '!seen[$0]++')  # two budgets may share a setting
leanvit sweep --model cifar10_vit12_w128 --data "$DATA" --threads 2 --batch-size 250 --out $RES/sweep \
    --methods "${specs[@]}"
bash benchmarks/archive/dynamicvit_reference.sh
bash benchmarks/archive/rl4evit_publish.sh | tee $RES/publish.txt
