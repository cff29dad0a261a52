"""The shipped RL4EViT policy and the one shipped before it, each against random tokens at its own
per-image counts (its random floor), on the held-out training images of the choice
(`benchmarks/archive/rl4evit_publish.sh`: 2,000 class-balanced training images no candidate read): a
comparison of the two that does not depend on their different GMACs.

    python benchmarks/archive/rl4evit_shipped_floor.py [DATA] > benchmarks/results/rl4evit_v2/shipped_vs_previous.json

The candidates of the choice (they fix its held-out images) are read from the record of the choice,
benchmarks/results/rl4evit_v2/shipped.json.

Not runnable as is any more: the policy it compares with (tests/data/rl4evit_legacy_policy.safetensors,
in git history) stores no options, and leanvit now refuses such a file; kept as the record of how
its numbers were made.
"""
import json
import sys
from pathlib import Path

import leanvit
from leanvit.data import eval_transform, make_loader
from leanvit.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from publish import untouched_images  # noqa: E402 (tools/publish.py: a maintainers' tool, not the library)

RES = "benchmarks/results/rl4evit_v2"
RUNS = [k for k in json.load(open(f"{RES}/shipped.json"))["results"] if k.startswith(RES)]
DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-jpeg.tar.gz"
LEGACY = dict(data=DATA, train_split="train", eval_split="test", limit_train=9600, seed=0)  # as rl4evit_publish.sh

model = leanvit.load_model("cifar10_vit12_w128")
configs = [json.load(open(f"{r}/train_metrics.json"))["config"] for r in RUNS] + [LEGACY]
held = untouched_images(DATA, configs, 2000, eval_transform(model))  # the same images as the choice
runners = {"dense": leanvit.adapt(model, "none"),
           "shipped": leanvit.adapt(model, "rl4evit", weights="cifar10_vit12_w128"),
           "previous": leanvit.adapt(model, "rl4evit", weights="tests/data/rl4evit_legacy_policy.safetensors")}
res = evaluate(runners, make_loader(held, batch_size=250, num_workers=0), controls=["shipped", "previous"])
keys = ("top1", "gmacs", "agreement", "kl_to_dense", "kl_to_dense_ci95", "vs_random_floor")
print(json.dumps(dict(images=len(held), data=DATA, split="train (held out from every candidate)",
                      results={k: {key: getattr(v, key) for key in keys} for k, v in res.items()}), indent=2))
