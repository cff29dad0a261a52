"""Devices, mixed precision and evaluation over several processes: --device/--amp on every command
that runs a model, one-line errors for what this machine lacks, bf16 autocast, and eval/sweep
under torchrun giving the one-process result."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import CIFAR
from leanvit.cli import main
from leanvit.data import batch_shard
from leanvit.device import DeviceError, check_amp, select_device

MODEL = "cifar10_vit12_w128"  # the shipped reference model: 32 px, 12 blocks of width 128
MODEL_COMMANDS = ["eval", "bench", "sweep", "match", "train", "train-supernet", "train-selector", "train-policy",
                  "demo"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_runs_a_model_takes_device_and_amp(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--device" in text and "cuda:N" in text and "--amp {off,bf16,fp16}" in text
    assert "AVX-512 BF16" in text and "slower than fp32" in text and "fp16 needs CUDA" in text


def test_select_device_here():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None) == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(DeviceError, match="not a device"):
        select_device("gpu0")
    with pytest.raises(DeviceError, match="cpu, cuda and mps"):
        select_device("meta")
    with pytest.raises(DeviceError, match="fp16 needs CUDA"):
        check_amp(torch.device("cpu"), "fp16")
    check_amp(torch.device("cpu"), "bf16")


@no_cuda
@pytest.mark.parametrize("command", ["eval", "train"])
def test_cuda_on_a_machine_without_it_is_one_line(command, tmp_path, capsys):
    args = {"eval": ["eval", "--model", MODEL, "--data", str(CIFAR), "--limit", "4"],
            "train": ["train", "--model", MODEL, "--data", str(CIFAR), "--out", str(tmp_path / "run")]}[command]
    assert main(args + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--device cuda" in err and "CUDA" in err and "--device cpu" in err


def test_fp16_on_cpu_and_fp16_training_are_one_line_errors(tmp_path, capsys):
    assert main(["bench", "--model", MODEL, "--methods", "tome:r=2", "--device", "cpu", "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "fp16 needs CUDA" in err
    if torch.cuda.is_available():  # training refuses fp16 (no loss scaling) where fp16 exists
        assert main(["train", "--model", MODEL, "--data", str(CIFAR), "--out", str(tmp_path / "r"),
                     "--device", "cuda", "--amp", "fp16"]) == 2
        assert "loss scaling" in capsys.readouterr().err


def _eval_json(tmp_path, capsys, *extra) -> dict:
    out = tmp_path / f"eval{'-'.join(extra)}.json"
    code = main(["eval", "--model", MODEL, "--data", str(CIFAR), "--split", "test", "--method", "tome", "--opt",
                 "r=2", "--limit", "40", "--batch-size", "20", "--workers", "0", "--json", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_bf16_eval_on_cpu_agrees_with_fp32(tmp_path, capsys):
    fp32, bf16 = _eval_json(tmp_path, capsys), _eval_json(tmp_path, capsys, "--amp", "bf16")
    assert (fp32["amp"], bf16["amp"], bf16["device"]) == ("off", "bf16", "cpu")
    assert bf16["n_images"] == fp32["n_images"] == 40
    assert bf16["gmacs"] == pytest.approx(fp32["gmacs"], rel=1e-12)  # ToMe's counts do not depend on precision
    # bf16 keeps 8 bits of mantissa: a few of 40 images may change class, not more
    assert abs(bf16["top1"] - fp32["top1"]) <= 10.0
    assert abs(bf16["dense"]["top1"] - fp32["dense"]["top1"]) <= 10.0
    assert bf16["agreement"] >= 80.0 and bf16["kl_to_dense"] < 0.1


def test_batch_shards_are_disjoint_and_cover_everything():
    for n, batch, world in [(44, 8, 2), (7, 3, 3), (5, 8, 2), (100, 10, 4)]:
        shards = [batch_shard(n, batch, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        for r, s in enumerate(shards):  # whole batches of the unsharded order, every world-th one
            assert all(i // batch % world == r for i in s)


# timing differs from run to run; the number of processes is what differs on purpose
TIMING = {"seconds", "images_per_second", "speedup", "speedup_iqr", "date", "processes"}


def _same(a, b, where="") -> list:
    """Where two JSON values differ (floats to 1e-9: sums over processes add in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - TIMING
        return [d for k in sorted(keys) for d in
                (_same(a.get(k), b.get(k), f"{where}.{k}") if k in a and k in b else [f"{where}.{k} missing"])]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _commands(out) -> list:
    # 44 images in batches of 8: six batches, the last of 4; two processes take 24 and 20 images.
    # PPT decides per image (and counts its branches), ToMe has fixed counts.
    common = ["--model", MODEL, "--data", str(CIFAR), "--split", "test", "--limit", "44", "--batch-size", "8",
              "--workers", "0", "--threads", "1"]
    return [["eval", *common, "--method", "ppt", "--opt", "r=10", "--opt", "threshold=scaled",
             "--json", str(out / "eval.json")],
            ["sweep", *common, "--methods", "tome:r=2", "ppt:r=10:threshold=scaled", "--out", str(out / "sweep")]]


def test_eval_and_sweep_on_two_processes_give_the_one_process_result(tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo): each takes its shard; the JSON is the one process's."""
    alone, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    try:
        for args in _commands(alone):
            assert main(args) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom leanvit.cli import main\n"
                      f"sys.exit(max(main(args) for args in {_commands(two)!r}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 2  # process 0 alone writes: the eval JSON, the sweep's files
    one_eval, two_eval = (json.loads((d / "eval.json").read_text()) for d in (alone, two))
    assert two_eval["processes"] == 2 and two_eval["n_images"] == 44
    assert 0 < two_eval["extra"]["prune_fraction_per_layer"]["3"] < 1  # a mixed batch: the statistics add up
    assert not _same(one_eval, two_eval), _same(one_eval, two_eval)
    one_sweep, two_sweep = (json.loads((d / "sweep" / "results.json").read_text()) for d in (alone, two))
    assert two_sweep["processes"] == 2 and len(two_sweep["rows"]) == 2
    assert not _same(one_sweep, two_sweep), _same(one_sweep, two_sweep)
    assert (two / "sweep" / "token_maps.png").is_file() and (two / "sweep" / "pareto.png").is_file()


def test_the_process_group_is_left_before_the_interpreter_tears_down(tmp_path):
    """Gloo's threads alive at interpreter teardown can abort a process that did its work (SIGABRT,
    seen once in CI). atexit handlers run last-registered first: one registered before the group is
    formed runs after leanvit's, and finds the group gone."""
    script = tmp_path / "leave.py"
    script.write_text("import atexit, os, pathlib\nimport torch.distributed as dist\n"
                      "from leanvit.device import init_distributed\n"
                      f"out = pathlib.Path({str(tmp_path)!r}) / ('left-' + os.environ['RANK'])\n"
                      "atexit.register(lambda: out.write_text(str(not dist.is_initialized())))\n"
                      "rank, world = init_distributed()\nassert world == 2 and dist.is_initialized()\n"
                      "dist.barrier()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"left-{rank}").read_text() for rank in (0, 1)] == ["True", "True"]


def test_bf16_training_on_cpu_keeps_fp32_weights(tmp_path):
    """--amp bf16 in a training: the steps and evaluations run under autocast (other numbers than
    fp32's), the weights and optimizer stay fp32."""
    from leanvit.train import TrainConfig, train
    from test_train import SMALL, weights
    runs = {}
    for amp in ("off", "bf16"):
        cfg = TrainConfig(out=str(tmp_path / amp), amp=amp, device="cpu", max_steps=2, **dict(SMALL, epochs=1))
        runs[amp] = train(cfg, log=lambda s: None)
    assert runs["bf16"]["steps"] == 2 and runs["bf16"]["config"]["amp"] == "bf16"
    w16, w32 = weights(tmp_path / "bf16"), weights(tmp_path / "off")
    floats = [k for k, v in w32.items() if v.is_floating_point()]  # (BatchNorm counts its batches in int64)
    assert floats and all(w16[k].dtype == torch.float32 and torch.isfinite(w16[k]).all() for k in floats)
    assert any(not torch.equal(w16[k], w32[k]) for k in floats)  # autocast was on
    assert max(float((w16[k] - w32[k]).abs().max()) for k in floats) < 0.05  # and close to fp32's steps
