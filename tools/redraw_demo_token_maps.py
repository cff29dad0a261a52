"""Redraw the demo's token-map picture alone, as `leanvit demo` draws it (the same class-balanced
subset, runners and layers), without re-running the evaluation, so that the demo's table, JSON
and Pareto plot stay the measured ones.

    python tools/redraw_demo_token_maps.py --data ../shared/data/cifar10-jpeg.tar.gz --out docs/demo/token_maps.png
"""
import argparse

from leanvit.data import eval_transform, load_dataset, model_label_names
from leanvit.demo import DEMO_MODEL, demo_specs, map_examples
from leanvit.evaluate import adapt_spec
from leanvit.models import load_model
from leanvit.token_maps import token_maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10-sample", help="what the demo read (default: the shipped sample)")
    parser.add_argument("--limit", type=int, default=2000, help="the demo's class-balanced subset (default 2000)")
    parser.add_argument("--out", default="docs/demo/token_maps.png")
    args = parser.parse_args()
    model = load_model(DEMO_MODEL)
    dataset = load_dataset(args.data, split="test", transform=eval_transform(model), num_classes=model.num_classes,
                           limit=args.limit, classes=model_label_names(model))
    by_method: dict = {}
    for spec in demo_specs():
        by_method.setdefault(spec.method, []).append(spec)
    models: dict = {}
    runners = {f"{s.method} {s.label}": adapt_spec(model, s, models)  # the middle budget, as the demo
               for s in (specs[len(specs) // 2] for specs in by_method.values())}
    images, boxes = map_examples(dataset, 4, model)
    depth, cfg = len(model.blocks), model.pretrained_cfg
    print(token_maps(runners, images, args.out, layers=(depth // 4, depth // 2, 3 * depth // 4),
                     image_mean=cfg.get("mean"), image_std=cfg.get("std"), boxes=boxes))


if __name__ == "__main__":
    main()
