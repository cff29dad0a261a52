"""Shipping into the zoo: a run's weights with their model card, the numbers in the card measured
on the shipped files as users load them. One card layout (:func:`model_card`) for every shipped
file: the reference model (:func:`publish`), PRANCE's meta-network and selector
(:func:`publish_prance`) and the RL4EViT policy (:func:`publish_rl4evit`).

A maintainers' tool of a source checkout, not part of the installed library: it trains, evaluates
and writes into ``src/leanvit/zoo/``. Import it with ``tools/`` on the path (the scripts in
``benchmarks/`` that ship files do)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from leanvit.data import eval_transform, load_dataset, make_loader
from leanvit.evaluate import evaluate
from leanvit.models import create_model, load_model
from leanvit.runtime import adapt
from leanvit.training import export_weights
from leanvit.zoo import ZOO_DIR, timm_architecture

MACHINE = "2-core x86_64 VM, no GPU"


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence]) -> str:
    """A markdown table; ``align`` one character per column: l (left) or r (right)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def model_card(name: str, about: str, usage: str, measured: str, trained: str) -> str:
    """Every model card's layout: what the file is, how to load it, what it measured (on the
    shipped file, with the command and its raw file) and how it was trained (the exact commands)."""
    return (f"# {name}\n\n{about.strip()}\n\n```python\n{usage.strip()}\n```\n\n## Measured\n\n{measured.strip()}\n\n"
            f"## How it was trained ({MACHINE})\n\n{trained.strip()}\n")


def write_card(name: str, text: str, zoo: Path = ZOO_DIR) -> Path:
    """``zoo/<name>.md``, written atomically."""
    path = Path(zoo) / f"{name}.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def ship_model(model: torch.nn.Module, name: str, timm_model: str, zoo: Path = ZOO_DIR) -> dict:
    """Write ``zoo/<name>.safetensors`` (fp16) and ``zoo/<name>.json``; returns the preprocessing."""
    zoo = Path(zoo)
    zoo.mkdir(exist_ok=True)
    export_weights(model, zoo / f"{name}.safetensors", half=True)
    pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.pretrained_cfg.items()
           if k in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "label_names")}
    spec = dict(timm_model=timm_model, kwargs={"num_classes": model.num_classes}, pretrained_cfg=pre)
    (zoo / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    return pre


# What each reference architecture is, and what it was trained on, for its model card.
ABOUT = {
    "vit12_convstem_w128_cifar": """A 12-block ViT for CIFAR-10 at 32x32 (`vit12_convstem_w128_cifar` in `leanvit/archs.py`): conv
stem to an 8x8 grid, CLS + 64 patch tokens = 65 tokens, timm pre-norm blocks. leanvit's reference
model for comparing token-reduction methods (decision layers 3, 6, 9 as in the papers).""",
    "vit12_convstem_w128_cluttered": """A 12-block ViT for cluttered CIFAR-10 (`vit12_convstem_w128_cluttered` in `leanvit/archs.py`):
each CIFAR-10 object at a random place and scale (a side of 16-40 px) on a 64x64 canvas of blurred
texture from another CIFAR image (`leanvit/data/cluttered.py`). A stem of three stride-2 convs to
the same 8x8 grid as the CIFAR-10 reference model, CLS + 64 patch tokens = 65 tokens, the same
blocks, so it costs what that model costs. leanvit's second testbed: the object covers a fifth of
the canvas on average, so which tokens a method keeps matters, and each image's box says whether
they are the object's.""",
}
TRAINED_ON = {
    "vit12_convstem_w128_cifar": ("the 50,000 CIFAR-10 (JPEG) training images from `../shared/data/`",
                                  "top-1 on the test split"),
    "vit12_convstem_w128_cluttered": ("49,000 of the 50,000 CIFAR-10 (JPEG) training images from `../shared/data/`,\n"
                                      "composed on a new canvas at a new place every epoch",
                                      "top-1 on the 1,000 training images held out from training, placements fixed"),
}


def publish(run_dir: str, name: str, command: str, data: Optional[str] = None) -> dict:
    """Ship the final weights of a `leanvit train` run as reference model ``name``.

    Writes ``zoo/<name>.safetensors`` (fp16), ``zoo/<name>.json`` (architecture and preprocessing)
    and ``zoo/<name>.md`` (the model card: command, wall time, data, and the top-1 of the *fp16*
    weights measured on the test split of ``data``, default the run's). Returns the measured result.
    """
    run = Path(run_dir)
    metrics = run_metrics(run)
    cfg = metrics["config"]
    model = create_model(cfg["model"], checkpoint=str(run / "final.safetensors"))
    pre = ship_model(model, name, cfg["model"])

    shipped = load_model(name)  # what users get: the fp16 file, loaded back in fp32
    data = data or cfg["data"]
    ds = load_dataset(data, split="test", transform=eval_transform(shipped), num_classes=shipped.num_classes)
    res = evaluate({"dense": adapt(shipped, "none")}, make_loader(ds, batch_size=250), desc=f"publish {name}")["dense"]
    hist = metrics["history"]
    size_mb = (ZOO_DIR / f"{name}.safetensors").stat().st_size / 2**20
    images, curve = TRAINED_ON[cfg["model"]]
    epochs = markdown_table(["epoch", "train loss", "top-1 %", "elapsed min"], "rrrr", [
        (h["epoch"], f"{h['train_loss']:.3f}", f"{h['top1']:.2f}", f"{h['elapsed_s'] / 60:.1f}") for h in hist])
    card = model_card(
        name, about=ABOUT[cfg["model"]],
        usage=f'import leanvit\nmodel = leanvit.load_model("{name}")',
        measured=f"""- **Top-1 on the test split of `{data}`, {res.n_images} images: {res.top1:.2f}%** (these fp16 weights
  loaded in fp32; measured by `tools/publish.py`, {res.skipped} images skipped), {res.gmacs:.4f} GMACs/image.
- Weights: `{name}.safetensors`, fp16, {size_mb:.1f} MB. Preprocessing in `{name}.json`
  (mean {pre['mean']}, std {pre['std']}, input {pre['input_size']}).""",
        trained=f"""Trained from scratch on {images},
{metrics['epochs_done']:.0f} epochs ({metrics['steps']} steps of a global batch of {cfg['batch_size']}),
{metrics['world_size']} data-parallel CPU processes, wall time {hist[-1]['elapsed_s'] / 60:.0f} min (with the pauses
for other measurements on the same machine). Command (`benchmarks/train_reference.sh`):

```
{command}
```

Per epoch, the fp32 weights during training ({curve}):

{epochs}""")
    write_card(name, card)
    return dict(top1=res.top1, gmacs=res.gmacs, n_images=res.n_images, size_mb=size_mb)


def publish_prance(meta_run: str, candidates: Sequence[str], data: str, name: str = "cifar10_vit12_w128_prance",
                   base: str = "cifar10_vit12_w128", zoo: Path = ZOO_DIR, holdout_images: int = 2000,
                   record: Optional[str] = None, shipped_by: str = "benchmarks/archive/publish_prance.sh") -> dict:
    """Ship PRANCE for the reference model ``base``: the meta-network of the `train-supernet` run
    ``meta_run`` (fp16, ``zoo/<name>.safetensors``) and, of the `train-selector` runs
    ``candidates`` (folders with ``selector.safetensors`` and metrics (:func:`run_metrics`), each on that
    meta-network), the one closest to dense (lowest mean KL) on ``holdout_images`` training images
    no selector read (:func:`held_out_choice`; the test set plays no part), as
    ``zoo/<name>.prance.safetensors`` (a byte copy). The card's numbers are the shipped files,
    loaded back, on the test split of ``data``; the choice goes to ``record`` (JSON)."""
    from leanvit.provenance import file_sha256, write_json
    meta_run, runs = Path(meta_run), [Path(c) for c in candidates]
    metrics = [run_metrics(r) for r in runs]
    ship_model(create_model(base, checkpoint=str(meta_run / "final.safetensors")), name, timm_architecture(base), zoo)
    shipped = create_model(base, checkpoint=str(Path(zoo) / f"{name}.safetensors")).eval()  # as users load it
    selectors = {str(r): adapt(shipped, "prance", weights=str(r / "selector.safetensors"), **m["config"]["options"])
                 for r, m in zip(runs, metrics)}
    held, res = held_out_choice(shipped, data, [m["config"] for m in metrics], selectors, holdout_images)
    chosen = min(runs, key=lambda r: res[str(r)].kl_to_dense)
    cfg = metrics[runs.index(chosen)]["config"]
    shutil.copyfile(chosen / "selector.safetensors", Path(zoo) / f"{name}.prance.safetensors")
    out = dict(chosen=str(chosen), date=time.strftime("%Y-%m-%d"), sha256=file_sha256(chosen / "selector.safetensors"),
               held_out=held, results={k: dict(top1=v.top1, gmacs=v.gmacs, agreement=v.agreement,
                                               kl_to_dense=v.kl_to_dense) for k, v in res.items()})
    if record:
        write_json(Path(record), out)
    ds = load_dataset(data, split="test", transform=eval_transform(shipped), num_classes=shipped.num_classes)
    runners = {"largest (dense)": adapt(shipped, "none"),
               "middle": adapt(shipped, "prance", subnet="middle"),
               "smallest": adapt(shipped, "prance", subnet="smallest"),
               "selector": selectors[str(chosen)]}
    test = evaluate(runners, make_loader(ds, batch_size=250), desc=f"publish {name}")
    card = prance_card(name, base, data, test, run_metrics(meta_run),
                       metrics[runs.index(chosen)], out, record, shipped_by)
    write_card(name, card, zoo)
    return dict(out, test={k: dict(top1=r.top1, gmacs=r.gmacs) for k, r in test.items()}, strategy=cfg["options"])


def run_metrics(folder: Path) -> dict:
    """A training run's ``metrics.json``, or the ``train_metrics.json`` copy that the benchmark
    scripts commit beside its results (the run folders themselves are not committed)."""
    for name in ("metrics.json", "train_metrics.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"no metrics.json or train_metrics.json in {folder}")


def held_out_choice(model, data: str, configs: Sequence[dict], runners: dict, n: int):
    """(description, results) of ``runners`` and the dense ``model`` on ``n`` class-balanced
    training images of ``data`` that none of the runs of ``configs`` read: where trained
    candidates are compared without the test set."""
    held = untouched_images(data, configs, n, eval_transform(model))
    res = evaluate({"dense": adapt(model, "none"), **runners}, make_loader(held, batch_size=250, num_workers=0),
                   desc="held-out choice")
    return f"{len(held)} class-balanced training images of {data} that no run read", res


def prance_card(name: str, base: str, data: str, res: dict, meta: dict, sel: dict, held: dict,
                record: Optional[str], shipped_by: str) -> str:
    cfg = sel["config"]
    options = " ".join(f"{k}={v}" for k, v in cfg["options"].items())
    measured = markdown_table(["configuration", "top-1 %", "GMACs/image"], "lrr",
                              [(k, f"{r.top1:.2f}", f"{r.gmacs:.4f}") for k, r in res.items()])
    history = markdown_table(["epoch", "smallest", "middle", "largest"], "rrrr", [
        (h["epoch"], f"{h['top1_smallest']:.2f}", f"{h['top1_middle']:.2f}", f"{h['top1']:.2f}") for h in meta["history"]])
    choice = markdown_table(["selector run", "GMACs/image", "agreement %", "KL to dense"], "lrrr", [
        (f"**{k}** (shipped)" if k == held["chosen"] else k, f"{v['gmacs']:.4f}", f"{v['agreement']:.2f}",
         f"{v['kl_to_dense']:.4f}") for k, v in held["results"].items() if k != "dense"])
    return model_card(
        name,
        about=f"""PRANCE for leanvit's reference model `{base}`: the channel-elastic meta-network (fp16,
`{name}.safetensors`) and a per-image selector (`{name}.prance.safetensors`, fp32, `{options}`,
trained for a GMACs budget of {cfg['budget']} of dense; these options are stored in the file).""",
        usage=f'import leanvit\nmodel = leanvit.load_model("{name}")\n'
              f'fast = leanvit.adapt(model, "prance", weights="{name}")',
        measured=f"""Measured by `publish_prance` of `tools/publish.py` on the {res['selector'].n_images:,} test images of
`{data}` with these shipped files ({res['selector'].skipped} images skipped):

{measured}

The selector's GMACs include its own MLP. Sub-networks: largest = all heads and MLP neurons per
block; middle = half and smallest = a quarter of them in the blocks after the first stage (the
first stage always runs at full width).

The selector was chosen on {held['held_out']} (`{record}`); the test set played no part in the
choice. It is the run below closest to the dense model there (lowest mean KL):

{choice}""",
        trained=f"""1. Meta-network, `leanvit train-supernet` from the shipped `{base}` (heads and neurons reordered by
   importance, {meta['epochs_done']:.0f} epochs of weight-sharing fine-tuning, {meta['history'][-1]['elapsed_s'] / 60:.0f} min).
   Top-1 of the sub-networks per epoch (epoch 0 = after reordering, before this training):

{history}

2. Selector, `leanvit train-selector` (`{options}`, budget {cfg['budget']}, the cost weight PI-controlled during
   training; {sel['steps']} PPO batches, {sel['history'][-1]['elapsed_s'] / 60:.0f} min): GMACs ratio {sel['gmacs_ratio']:.3f} on the
   held-out training images it was checked on (within 5% of the budget: {sel['budget_met']}), final cost weight
   {sel['cost_weight']:.4g}.

Shipped by `{shipped_by}`.""")


def trained_on(config: dict) -> set:
    """Paths of every training-split image a `train-policy` run (its metrics' ``config``) read:
    the images it trained on and, with the default ``holdout`` evaluation, those it calibrated on."""
    from types import SimpleNamespace
    from leanvit.training import HOLDOUT, holdout_split
    cfg = SimpleNamespace(**config)
    if cfg.eval_split == HOLDOUT:
        train, held = holdout_split(cfg, None, None, None)
        return set(train.paths) | set(held.paths)
    return set(load_dataset(cfg.data, split=cfg.train_split, limit=cfg.limit_train, seed=cfg.seed).paths)


def untouched_images(data: str, configs: Sequence[dict], n: int, transform, seed: int = 0, split: str = "train"):
    """A class-balanced ``n``-image subset of ``split`` that none of the runs of ``configs`` read:
    where policies trained on other images are compared and one is chosen, without the test set."""
    from leanvit.data import balanced_subset
    every = load_dataset(data, split=split)
    seen = set().union(*(trained_on(c) for c in configs))
    free = [i for i, path in enumerate(every.paths) if path not in seen]
    if len(free) < n:
        raise ValueError(f"only {len(free)} images of the {split} split are untouched by the runs, fewer than {n}")
    pick = balanced_subset([every.targets[i] for i in free], n, seed)
    # fixed images: a cluttered training split would otherwise draw new placements on every read
    return every.subset([free[i] for i in pick], transform).for_evaluation()


def publish_rl4evit(candidates: Sequence[str], name: str = "cifar10_vit12_w128", zoo: Path = ZOO_DIR,
                    holdout_images: int = 2000, previous: Optional[tuple] = None,
                    record: Optional[str] = None, shipped_by: str = "benchmarks/archive/rl4evit_publish.sh") -> dict:
    """Ship one of ``candidates`` (result folders of `benchmarks/rl4evit_v2.sh`: ``policy.safetensors``,
    ``train_metrics.json``, ``match.json``, ``sweep/results.json``) as ``zoo/<name>.rl4evit.safetensors``
    with its model card: the one closest to the dense model (lowest mean KL) on ``holdout_images``
    training images that no candidate read (:func:`untouched_images`): the test set plays no part in
    the choice. ``previous``: (label, policy file, its training config) of the policy shipped before,
    measured on the same images: only a candidate better than it there competes, i.e. one no further
    from dense (KL) at no more GMACs, and strictly better in one; without such a candidate nothing is
    shipped and a ValueError says why. The held-out results go to ``record`` (JSON, written either
    way) and are returned; the card's test numbers are the chosen run's sweep; ``shipped_by``: the
    command that shipped it, for the card."""
    from leanvit.provenance import file_sha256, write_json
    runs = [Path(c) for c in candidates]
    metrics = [run_metrics(r) for r in runs]
    model = load_model(name)
    data = metrics[0]["config"]["data"]
    runners = {str(r): adapt(model, "rl4evit", weights=str(r / "policy.safetensors")) for r in runs}
    if previous:
        runners[previous[0]] = adapt(model, "rl4evit", weights=str(previous[1]))
    held, res = held_out_choice(model, data, [m["config"] for m in metrics] + ([previous[2]] if previous else []),
                                runners, holdout_images)
    cost = {k: (v.kl_to_dense, v.gmacs) for k, v in res.items()}
    # better: no worse in KL and GMACs, and not equal in both
    better = [r for r in runs if not previous or
              cost[str(r)] != cost[previous[0]] and all(a <= b for a, b in zip(cost[str(r)], cost[previous[0]]))]
    chosen = min(better, key=lambda r: cost[str(r)][0]) if better else None
    out = dict(chosen=str(chosen) if chosen else None, date=time.strftime("%Y-%m-%d"),
               sha256=file_sha256(chosen / "policy.safetensors") if chosen else None,
               held_out=held,
               previous=previous[0] if previous else None,
               better_than_previous=[str(r) for r in better] if previous else None,
               results={k: dict(top1=v.top1, gmacs=v.gmacs, agreement=v.agreement, kl_to_dense=v.kl_to_dense,
                                kl_to_dense_ci95=v.kl_to_dense_ci95) for k, v in res.items()})
    if record:
        write_json(Path(record), out)
    if not chosen:
        kl, gmacs = cost[previous[0]]
        raise ValueError(f"no candidate is better than {previous[0]} on the held-out images (no further from dense "
                         f"than its KL {kl:.4f} at no more than its {gmacs:.4f} GMACs): nothing shipped")
    shutil.copyfile(chosen / "policy.safetensors", Path(zoo) / f"{name}.rl4evit.safetensors")
    card = rl4evit_card(name, chosen, metrics[runs.index(chosen)], out, record, zoo, shipped_by)
    write_card(f"{name}.rl4evit", card, zoo)
    return out


def rl4evit_card(name: str, run: Path, metrics: dict, held: dict, record: Optional[str], zoo: Path,
                 shipped_by: str) -> str:
    """The model card of a policy shipped by :func:`publish_rl4evit`."""
    cfg, ppo = metrics["config"], metrics["config"]["ppo"]
    sweep = json.loads((run / "sweep" / "results.json").read_text())
    match = json.loads((run / "match.json").read_text())
    dense = sweep["dense"]
    row = next(r for r in sweep["rows"] if r["method"] == "rl4evit")
    floor, vs = row["random_floor"], row["vs_random_floor"]
    f = adapt(load_model(name), "rl4evit", weights=str(run / "policy.safetensors")).method
    after = [b if f.placement == "before" else b + 1 for b in f.layers]  # the block right after each decision
    kept = ", ".join(f"{match['mean_tokens'][b]:.1f}" for b in after)
    size = (Path(zoo) / f"{name}.rl4evit.safetensors").stat().st_size / 2 ** 20
    ci = lambda v, d=4, sign="+": f"[{v[0]:{sign}.{d}f}, {v[1]:{sign}.{d}f}]"  # noqa: E731
    lo, hi = vs["kl_to_dense_ci95"]
    than_floor = ("Random tokens kept at its own per-image counts, on the same images, are closer to dense (BENCHMARKS.md, "
                  '"Do the learned methods choose better than random tokens?", on why)' if lo > 0 else
                  "It is closer to dense than random tokens kept at its own per-image counts" if hi < 0 else
                  "It is as close to dense as random tokens kept at its own per-image counts (the interval holds 0)")
    choice = markdown_table(["run", "GMACs/image", "agreement %", "KL to dense"], "lrrr", [
        (f"**{k}** (shipped)" if k == str(run) else "the policy shipped before" if k == held.get("previous") else k,
         f"{v['gmacs']:.4f}", f"{v['agreement']:.2f}",
         f"{v['kl_to_dense']:.4f}") for k, v in held["results"].items() if k != "dense"])
    rule = (f" among those better than the policy shipped before (no further from dense at "
            f"no more GMACs: {len(held['better_than_previous'])} of the {len(held['results']) - 2} runs)") if held.get("previous") else ""
    options = " ".join(f"--opt {k}={v if isinstance(v, str) else json.dumps(v).replace(' ', '')}"
                       for k, v in cfg["options"].items())
    return model_card(
        f"{name}.rl4evit",
        about=f"""The RL4EViT policy (actor and critic, multi-agent PPO, one agent per token) trained for the
reference model `{name}` for {cfg['budget']} of its dense GMACs (the actor included); the ViT itself is
unchanged (frozen in training). Decisions before blocks {', '.join(map(str, f.layers))} (the paper's
placement), actor {f.agents}-agent with hidden layers {list(f.hidden)}, input LayerNorm {str(f.input_norm).lower()};
these options are stored in the file and load with it.""",
        usage=f'import leanvit\nfast = leanvit.adapt(leanvit.load_model("{name}"), "rl4evit", weights="{name}")\n'
              f'# CLI: --method rl4evit --opt weights={name}',
        measured=f"""- **Top-1 on the test split of `{cfg['data']}`, {row['n_images']} images: {row['top1']:.2f}%** (dense {dense['top1']:.2f}%,
  difference {row['delta_top1']:+.2f} {ci(row['delta_top1_ci95'], 2)} paired 95%), agreement with dense
  {row['agreement']:.2f}%, KL to dense {row['kl_to_dense']:.4f} {ci(row['kl_to_dense_ci95'], sign="")},
  **{row['gmacs']:.4f} GMACs/image** ({row['gmacs'] / dense['gmacs']:.3f} of dense {dense['gmacs']:.4f}, the actor on
  every live patch at each decision included); measured by the `leanvit sweep --random-floor`
  of `benchmarks/rl4evit_v2.sh` (`{run}/sweep/results.json`; this file is a byte copy of
  `{run}/policy.safetensors`, sha256 {held['sha256'][:16]}...). On average it keeps {kept} tokens
  (CLS included, of {int(match['mean_tokens'][0])}) in the blocks after its decisions
  ({match['n_images']} test images, `{run}/match.json`).
- {than_floor}: floor KL {floor['kl_to_dense']:.4f}, KL - floor {vs['kl_to_dense']:+.4f}
  {ci(vs['kl_to_dense_ci95'])} (paired 95%).
- Weights: fp32, {size:.2f} MB.

Chosen on {held['held_out']} (`{record}`); the test set played no part in the choice.
It is the run below closest to the dense model there (lowest mean KL){rule}:

{choice}""",
        trained=f"""Budget {cfg['budget']} of dense: the cost weight alpha PI-controlled toward it, then the keep logit
calibrated on {cfg['limit_eval']} held-out training images, never trained on (GMACs ratio {metrics['gmacs_ratio']:.3f}
there); beta = {cfg['beta']:g}, reward `{cfg['reward']}`, r2 to the `{cfg['r2_to']}` agents; {metrics['steps']} PPO
rollouts of {cfg['batch_size']} images ({cfg['epochs']} epochs of a class-balanced {cfg['limit_train']:,}-image subset
of the training split of `{cfg['data']}`), K = {ppo['epochs']} PPO iterations per rollout, Adam {ppo['lr_actor']:g} (actor) and
{ppo['lr_critic']:g} (critic), clip {ppo['clip']:g}, entropy {ppo['entropy_coef']:g}, gamma {ppo['gamma']:g},
lambda {ppo['lam']:g}; 1 process with 2 threads, {metrics['history'][-1]['elapsed_s'] / 60:.0f} min. Command (one run
of `benchmarks/rl4evit_v2.sh`):

```
leanvit train-policy --model {name} --data {cfg['data']} --threads 2 {options} \\
    --budget {cfg['budget']} --reward {cfg['reward']} --r2-to {cfg['r2_to']} --seed {cfg['seed']} --epochs {cfg['epochs']} \\
    --batch-size {cfg['batch_size']} --limit-train {cfg['limit_train']} --limit-eval {cfg['limit_eval']} --out {cfg['out']}
```

Chosen and shipped by `{shipped_by}`.""")
