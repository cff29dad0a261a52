"""Carry a training's resume checkpoint (`<run>/last.pt`) across machines in files git can hold.

A session may end before a long training does, and the next one may start on a new machine; the
run directory is not committed (a last.pt of the reference models with AdamW holds three copies of
the weights, about 28 MB). `pack` writes it as

* `weights.safetensors`: every tensor of the model's state, as saved (fp32);
* `optimizer.safetensors`: AdamW's moments in bfloat16 (half the bytes; bf16 keeps fp32's range,
  which the squared-gradient moment needs), the step counts, and torch's RNG state;
* `state.json`: everything else (step, history, configuration, optimizer groups, numpy and Python
  RNG states).

`unpack` rebuilds last.pt from them; the run then resumes where it stopped. The moments come back
rounded to bf16, so the resumed run differs from an uninterrupted one by that rounding only.

    python tools/checkpoint_pack.py pack runs/cluttered-w128 benchmarks/results/cluttered/resume
    python tools/checkpoint_pack.py unpack benchmarks/results/cluttered/resume runs/cluttered-w128
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MOMENTS = ("exp_avg", "exp_avg_sq")


def pack(run: Path, dest: Path) -> None:
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt["model"].items()}, dest / "weights.safetensors")
    opt, tensors = ckpt["optimizer"], {"rng.torch": ckpt["rng"]["torch"]}
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value.to(torch.bfloat16) if key in MOMENTS else value.reshape(1)
    save_file(tensors, dest / "optimizer.safetensors")
    numpy_rng = dict(ckpt["rng"]["numpy"], keys=ckpt["rng"]["numpy"]["keys"].tolist())
    rest = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
    state = dict(rest, param_groups=opt["param_groups"], rng=dict(numpy=numpy_rng, python=ckpt["rng"]["python"]))
    (dest / "state.json").write_text(json.dumps(state, indent=1))


def unpack(src: Path, run: Path) -> None:
    state = json.loads((src / "state.json").read_text())
    tensors = load_file(src / "optimizer.safetensors")
    opt_state = {}
    for name, value in tensors.items():
        if name.startswith("rng."):
            continue
        index, key = name.split(".", 1)
        opt_state.setdefault(int(index), {})[key] = value.float() if key in MOMENTS else value.reshape(())
    rng = state.pop("rng")
    rng["numpy"]["keys"] = torch.tensor(rng["numpy"]["keys"], dtype=torch.int64)
    rng["torch"] = tensors["rng.torch"]
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state.pop("param_groups")]
    optimizer = dict(state=opt_state, param_groups=groups)
    ckpt = dict(state, model=load_file(src / "weights.safetensors"), optimizer=optimizer, rng=rng)
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / "last.pt.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, run / "last.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description="pack a run's last.pt into safetensors + JSON, or unpack it")
    ap.add_argument("action", choices=("pack", "unpack"))
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    (pack if args.action == "pack" else unpack)(args.source, args.dest)


if __name__ == "__main__":
    main()
