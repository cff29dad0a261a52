"""The comparison behind `leanvit sweep` and `leanvit demo`: every method at several budgets on one
model and data set, as a table, a JSON file, a Pareto plot and a token-map picture."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

DEMO_MODEL = "cifar10_vit12_w128"

# Budgets for a 65-token model (CLS + 8x8): two or three per parameter-free method.
DEMO_SPECS: List[Tuple[str, str, dict]] = [
    ("tome", "r=2", {"r": 2}), ("tome", "r=3", {"r": 3}), ("tome", "r=4", {"r": 4}),
    ("evit", "keep=0.9", {"keep_rate": 0.9}), ("evit", "keep=0.7", {"keep_rate": 0.7}),
    ("evit", "keep=0.5", {"keep_rate": 0.5}),
    ("ppt", "r=6", {"r": 6, "threshold": "scaled"}), ("ppt", "r=10", {"r": 10, "threshold": "scaled"}),
    ("ppt", "r=14", {"r": 14, "threshold": "scaled"}),
    ("ats", "tokens=1.0", {"tokens": 1.0}), ("ats", "tokens=0.7", {"tokens": 0.7}),
    ("ats", "tokens=0.5", {"tokens": 0.5}),
    ("random", "keep=0.9", {"keep_rate": 0.9}), ("random", "keep=0.7", {"keep_rate": 0.7}),
    ("random", "keep=0.5", {"keep_rate": 0.5}),
]
# Learned methods whose weights are shipped for the demo model (zoo/<model>.<method>.safetensors).
DEMO_LEARNED: List[Tuple[str, str, dict]] = [
    ("rl4evit", "shipped policy", {"weights": DEMO_MODEL}),
]


def demo_specs() -> List[Tuple[str, str, dict]]:
    """The parameter-free methods' budgets, then every learned method shipped for the demo model."""
    from .zoo import list_method_weights
    return DEMO_SPECS + [s for s in DEMO_LEARNED if DEMO_MODEL in list_method_weights(s[0])]


def spec_from_text(text: str) -> Tuple[str, str, dict]:
    """'ppt:r=10:threshold=scaled' -> ('ppt', 'r=10 threshold=scaled', {...})."""
    from .cli import parse_options
    method, *pairs = text.split(":")
    return method, " ".join(pairs) or "default", parse_options(pairs)


def run_comparison(model, model_name: str, dataset, specs, out_dir: str, batch_size: int = 250,
                   workers: Optional[int] = None, map_images: int = 4) -> dict:
    """Evaluate dense + ``specs`` on ``dataset``; write results.json, pareto.png, token_maps.png."""
    import leanvit
    from .data import make_loader
    from .evaluate import sweep
    from .report import format_table, pareto_plot, token_maps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    loader = make_loader(dataset, batch_size=batch_size, num_workers=workers)
    result = sweep(model, loader, specs, desc=f"{model_name}: {len(specs) + 1} configurations")
    result.update(model=model_name, data=str(dataset.root), split=getattr(dataset, "split", None),
                  n_images=result["dense"]["n_images"], threads=torch.get_num_threads(), batch_size=batch_size,
                  date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0, 1))
    for row in result["rows"]:
        row["speedup"] = row["images_per_second"] / result["dense"]["images_per_second"]
    _write_json(out / "results.json", result)
    pareto_plot([dict(method=r["method"], label=r["label"], gmacs=r["gmacs"], top1=r["top1"]) for r in result["rows"]],
                out / "pareto.png", title=f"{model_name} on {Path(str(dataset.root)).name} "
                f"({result['n_images']} images)", dense=result["dense"])
    # token maps: the middle budget of every method, on the first few images
    firsts = {}
    for method, label, options in specs:
        firsts.setdefault(method, []).append((label, options))
    runners = {f"{m} {v[len(v) // 2][0]}": leanvit.adapt(model, m, **v[len(v) // 2][1]) for m, v in firsts.items()}
    images = torch.stack([dataset[i][0] for i in range(min(map_images, len(dataset)))
                          if dataset[i][0] is not None])
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    depth = len(model.blocks)
    token_maps(runners, images, out / "token_maps.png", layers=(depth // 4, depth // 2, 3 * depth // 4),
               image_mean=cfg.get("mean"), image_std=cfg.get("std"))
    table = format_table(result["rows"], result["dense"])
    (out / "table.txt").write_text(table + "\n")
    return dict(result, table=table)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
