"""The comparison behind `leanvit sweep` and `leanvit demo`: every method at several budgets on one
model and data set, as a table, a JSON file, a Pareto plot and a token-map picture."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import torch

from .options import Spec

DEMO_MODEL = "cifar10_vit12_w128"
PRANCE_MODEL = "cifar10_vit12_w128_prance"  # the demo model made channel-elastic (PRANCE's meta-network)
# The demo's two testbeds, each with its reference model: CIFAR-10 (one object filling a 32x32
# frame) and cluttered CIFAR-10 (the object at a random place and scale on a 64x64 textured
# canvas, so that which tokens a method keeps matters, and can be checked against the object's box).
TESTBEDS = {"cifar10": DEMO_MODEL, "cluttered": "cluttered_cifar10_vit12_w128"}


# Budgets for a 65-token model (CLS + 8x8): two or three per parameter-free method.
DEMO_SPECS: List[Spec] = [Spec(*s) for s in [
    ("tome", "r=2", {"r": 2}), ("tome", "r=3", {"r": 3}), ("tome", "r=4", {"r": 4}),
    ("evit", "keep=0.9", {"keep_rate": 0.9}), ("evit", "keep=0.7", {"keep_rate": 0.7}),
    ("evit", "keep=0.5", {"keep_rate": 0.5}),
    ("ppt", "r=6", {"r": 6, "threshold": "scaled"}), ("ppt", "r=10", {"r": 10, "threshold": "scaled"}),
    ("ppt", "r=14", {"r": 14, "threshold": "scaled"}),
    ("ats", "tokens=1.0", {"tokens": 1.0}), ("ats", "tokens=0.7", {"tokens": 0.7}),
    ("ats", "tokens=0.5", {"tokens": 0.5}),
    ("random", "keep=0.9", {"keep_rate": 0.9}), ("random", "keep=0.7", {"keep_rate": 0.7}),
    ("random", "keep=0.5", {"keep_rate": 0.5}),
]]
def learned_specs(model: str) -> List[Spec]:
    """The learned methods that may be shipped for ``model`` (zoo/<model>.<method>.safetensors):
    its RL4EViT policy, and PRANCE's selector on its meta-network ``<model>_prance``."""
    return [Spec("rl4evit", "shipped policy", {"weights": model}),
            Spec("prance", "shipped selector, on its meta-network", {"weights": f"{model}_prance"},
                 model=f"{model}_prance")]


def demo_specs(model: str = DEMO_MODEL) -> List[Spec]:
    """The parameter-free methods' budgets, then every learned method shipped for ``model``."""
    from .models import list_models
    from .zoo import list_method_weights
    return DEMO_SPECS + [s for s in learned_specs(model) if s.options["weights"] in list_method_weights(s.method)
                         and (s.model is None or s.model in list_models())]


def map_examples(dataset, n: int, model):
    """The images of the token maps, the readable ones among the first ``n`` of ``dataset``, and
    their object boxes as ``model`` sees them, where the data has boxes (else None):
    ((B, C, H, W), (B, 4) or None)."""
    # one read per item: a training split of a cluttered set draws a new placement on every read,
    # so a box read apart from its image could frame another place
    items = [item for item in (dataset[i] for i in range(min(n, len(dataset)))) if item[0] is not None]
    images = torch.stack([item[0] for item in items])
    if not getattr(dataset, "has_boxes", False):
        return images, None
    from .objects import boxes_as_seen
    return images, boxes_as_seen(torch.stack([torch.as_tensor(item[2]) for item in items]), model)


def run_comparison(model, model_name: str, dataset, specs, out_dir: str, batch_size: int = 250,
                   workers: Optional[int] = None, map_images: int = 4, provenance: Optional[dict] = None,
                   amp: str = "off", random_floor: bool = False, shuffled_floor: bool = False) -> dict:
    """Evaluate dense + ``specs`` on ``dataset`` on the model's device at ``amp`` precision; write
    results.json (with ``provenance``, what the numbers were computed from), pareto.png,
    token_maps.png. Under torchrun every process evaluates its shard of the images, and process 0
    alone writes the files (the others return the same result, without ``table``)."""
    from .data import make_loader
    from .device import init_distributed, module_device, pin_memory
    from .evaluate import adapt_spec, sweep
    from .provenance import write_json
    from .report import format_floor_table, format_sweep_table, pareto_plot
    from .token_maps import token_maps
    device = module_device(model)
    rank, world = init_distributed(device)
    out = Path(out_dir)
    t0 = time.time()
    loader = make_loader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory(device),
                         shard=(rank, world))
    result = sweep(model, loader, specs, desc=f"{model_name}: {len(specs) + 1} configurations", amp=amp,
                   random_floor=random_floor, shuffled_floor=shuffled_floor)
    if getattr(dataset, "has_boxes", False):
        from .objects import attach_object_measures
        attach_object_measures(result, model, loader, specs)
    result.update(model=model_name, data=str(dataset.root), split=getattr(dataset, "split", None),
                  n_images=result["dense"]["n_images"], threads=torch.get_num_threads(), batch_size=batch_size,
                  processes=world, device=str(device), amp=amp, date=time.strftime("%Y-%m-%d"),
                  seconds=round(time.time() - t0, 1), provenance=provenance)
    if rank != 0:
        return result
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    pareto_plot(result["rows"], out / "pareto.png", title=f"{model_name} on {Path(str(dataset.root)).name} "
                f"({result['n_images']} images)", dense=result["dense"])
    # token maps: the middle budget of every method, on the first few images
    firsts = {}
    for spec in specs:
        firsts.setdefault(spec.method, []).append(spec)
    models: dict = {}
    middle = [v[len(v) // 2] for v in firsts.values()]
    runners = {f"{s.method} {s.label}": adapt_spec(model, s, models) for s in middle}
    images, boxes = map_examples(dataset, map_images, model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    depth = len(model.blocks)
    token_maps(runners, images, out / "token_maps.png", layers=(depth // 4, depth // 2, 3 * depth // 4),
               image_mean=cfg.get("mean"), image_std=cfg.get("std"), boxes=boxes)
    table = format_sweep_table(result["rows"], result["dense"])
    for kind, wanted in (("random", random_floor or shuffled_floor), ("shuffled", shuffled_floor)):
        if wanted:
            table += "\n" + format_floor_table(result["rows"], kind)
    if getattr(dataset, "has_boxes", False):
        from .objects import format_object_table
        table += "\n\nwhich tokens each method keeps (object boxes):\n" + format_object_table(result["rows"])
    (out / "table.txt").write_text(table + "\n")
    return dict(result, table=table)
