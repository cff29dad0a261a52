"""Training: seeded, resumable with the same result, atomic checkpoints, torchrun data-parallel."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CIFAR
from leanvit.train import TrainConfig, train
from leanvit.training import epoch_indices, lr_at


SMALL = dict(model="vit12_convstem_w96_cifar", data=str(CIFAR), epochs=2, batch_size=16, limit_train=64,
             limit_eval=32, workers=0, save_every=3, lr=1e-3, warmup_epochs=0.5)


def weights(out):
    return load_file(str(Path(out) / "final.safetensors"))


def test_schedule_and_sharding():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    a = epoch_indices(50, 0, 3, 0, 2, 4)
    b = epoch_indices(50, 0, 3, 1, 2, 4)
    assert len(a) == len(b) == 24 and not set(a) & set(b)
    assert epoch_indices(50, 0, 3, 0, 1, 4) != epoch_indices(50, 0, 4, 0, 1, 4)  # new order every epoch


def test_resume_gives_the_same_result(tmp_path):
    full = train(TrainConfig(out=str(tmp_path / "full"), **SMALL), log=lambda s: None)
    part = tmp_path / "part"
    first = train(TrainConfig(out=str(part), max_steps=5, **SMALL), log=lambda s: None)  # killed mid epoch 2
    assert first["steps"] == 5 and (part / "last.pt").is_file()
    assert not list(part.glob("*.tmp"))  # writes are atomic
    resumed = train(TrainConfig(out=str(part), **SMALL), log=lambda s: None)
    assert resumed["steps"] == full["steps"] == 8
    wf, wr = weights(tmp_path / "full"), weights(part)
    assert wf.keys() == wr.keys()
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [h["top1"] for h in resumed["history"]] == [h["top1"] for h in full["history"]]
    assert len(full["history"]) == 2 and all("train_loss" in h for h in full["history"])


def test_resume_refuses_another_configuration(tmp_path):
    train(TrainConfig(out=str(tmp_path), max_steps=1, **SMALL), log=lambda s: None)
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(out=str(tmp_path), **dict(SMALL, lr=5e-4)), log=lambda s: None)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_or_corrupt_checkpoint_is_refused_and_inert(tmp_path, capsys):
    """Resume reads OUT/last.pt with weights_only=True: a pickle that would run code is refused
    before it runs; a corrupt file names itself and the way out (--restart), which works."""
    from leanvit.cli import main
    from leanvit.training import CheckpointError
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"config": {}, "rng": _Payload(marker)}, out / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt is corrupt or not a leanvit checkpoint.*--restart"):
        train(TrainConfig(out=str(out), **SMALL), log=lambda s: None)
    assert not marker.exists()
    for bad in (b"", b"PK\x03\x04 truncated zip", os.urandom(4096)):
        (out / "last.pt").write_bytes(bad)
        with pytest.raises(CheckpointError, match="remove it, or pass --restart"):
            train(TrainConfig(out=str(out), **SMALL), log=lambda s: None)
    torch.save([1, 2], out / "last.pt")  # loads, but is no resume state
    with pytest.raises(CheckpointError, match="not a leanvit resume checkpoint"):
        train(TrainConfig(out=str(out), **SMALL), log=lambda s: None)
    args = ["train", "--model", SMALL["model"], "--data", SMALL["data"], "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--limit-train", "32", "--limit-eval", "16", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "leanvit: error:" in err and str(out / "last.pt") in err and "Traceback" not in err
    assert main(args + ["--restart"]) == 0 and (out / "final.safetensors").is_file()
    assert not marker.exists()


def test_training_learns_and_finetunes_with_a_method(tmp_path):
    """A few steps with PPT active: the loss is finite and the weights move; eval runs with PPT."""
    cfg = TrainConfig(out=str(tmp_path), method="ppt", options={"r": 8, "threshold": "scaled"},
                      **dict(SMALL, epochs=1))
    m = train(cfg, log=lambda s: None)
    assert m["steps"] == 4 and 0.0 <= m["top1"] <= 100.0
    assert m["evaluated_on"] == "32 held-out images of the train split (never trained on)"  # not test images
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())
    assert m["history"][0]["train_loss"] < 5.0


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_keep_identical_replicas(tmp_path):
    out = tmp_path / "ddp"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "leanvit", "train",
           "--model", SMALL["model"], "--data", SMALL["data"], "--out", str(out), "--epochs", "1",
           "--batch-size", "16", "--limit-train", "64", "--limit-eval", "32", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4  # 64 images / 16 per step
    assert metrics["replica_max_abs_diff"] == 0.0
    log = (out / "train.log").read_text()
    assert log.count("done: top-1") == 1  # only rank 0 logs


def test_training_a_learned_method_with_distillation(tmp_path):
    """DynamicViT trains its predictors (ratio loss added) with KL to the dense starting model;
    its weights come out next to the ViT's and load back through weights=."""
    import leanvit
    cfg = TrainConfig(out=str(tmp_path), method="dynamicvit", options={"keep_rate": 0.7}, distill=0.5,
                      max_steps=3, **dict(SMALL, epochs=1))
    m = train(cfg, log=lambda s: None)
    assert m["steps"] == 3 and (tmp_path / "method.safetensors").is_file()
    model = leanvit.create_model(SMALL["model"], checkpoint=str(tmp_path / "final.safetensors"))
    f = leanvit.adapt(model, "dynamicvit", keep_rate=0.7, weights=str(tmp_path / "method.safetensors"))
    frozen = TrainConfig(out=str(tmp_path / "lr0"), method="dynamicvit", options={"keep_rate": 0.7}, distill=0.5,
                         max_steps=3, **dict(SMALL, epochs=1, lr=0.0, min_lr=0.0))
    train(frozen, log=lambda s: None)  # same seeds and steps, learning rate 0: the initial predictors
    from safetensors.torch import load_file
    start = load_file(str(tmp_path / "lr0" / "method.safetensors"))
    trained = f.method.state_dict()
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # the predictors were trained


def test_backbone_learning_rate_scale_and_freeze(tmp_path):
    """DynamicViT's authors' recipe: the predictors at the learning rate, the ViT frozen for the
    first epochs and then at a fraction of it."""
    runs = {}
    for name, extra in (("frozen", dict(freeze_backbone_epochs=1.0)), ("scaled", dict(backbone_lr_scale=0.01)),
                        ("full", {}), ("start", dict(lr=0.0, min_lr=0.0))):
        out = tmp_path / name
        train(TrainConfig(out=str(out), method="dynamicvit", options={"keep_rate": 0.7}, max_steps=3,
                          **dict(SMALL, epochs=1, **extra)), log=lambda s: None)
        runs[name] = (weights(out), load_file(str(out / "method.safetensors")))

    def moved(name, part, keys):
        return max(float((runs[name][part][k].float() - runs["start"][part][k].float()).abs().max()) for k in keys)

    blocks = [k for k in runs["start"][0] if k.startswith("blocks.")]
    predictors = list(runs["start"][1])
    assert moved("frozen", 0, blocks) == 0.0  # the ViT did not move during its frozen epoch
    assert 0 < moved("scaled", 0, blocks) < 0.1 * moved("full", 0, blocks)
    for name in ("frozen", "scaled"):  # while the predictors trained at the full rate
        assert moved(name, 1, predictors) > 0.5 * moved("full", 1, predictors)


def test_policy_training_evaluates_on_held_out_training_images(tmp_path):
    """The policy trainings' default evaluation (budget checks, calibration, selection) is a
    class-balanced slice of the training split, disjoint from the images they train on."""
    from types import SimpleNamespace

    from leanvit.data import eval_transform
    from leanvit.training import holdout_split
    from leanvit.train_policy import PolicyRun
    from leanvit.train_prance import SelectorConfig
    assert PolicyRun(model="m", out="o").eval_split == SelectorConfig(model="m", out="o").eval_split == "holdout"
    assert TrainConfig(model="m", out="o").eval_split == "holdout"  # train and train-supernet too
    cfg = SimpleNamespace(data=str(CIFAR), train_split="train", limit_train=100, limit_eval=40, seed=0)
    tf = eval_transform(dict(input_size=(3, 32, 32)))
    train_set, held = holdout_split(cfg, 10, tf, tf)
    assert len(train_set) == 100 and len(held) == 40
    assert not set(train_set.paths) & set(held.paths)
    assert all(":train/" in p for p in train_set.paths + held.paths)
    assert sorted(held.targets) == sorted(list(range(10)) * 4)  # balanced
    with pytest.raises(ValueError, match="too few to hold out"):
        holdout_split(SimpleNamespace(**dict(cfg.__dict__, limit_train=None, limit_eval=5000)), 10, tf, tf)
