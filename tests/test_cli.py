"""The command line: eval / bench output and JSON, and clear errors for every bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import save_file

from conftest import CIFAR
from leanvit.cli import main
from leanvit.options import Spec, parse_options, parse_spec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGENETTE = SHARED / "imagenette-val-224.tar"
needs_data = pytest.mark.skipif(not IMAGENETTE.is_file(), reason="offline data in ../shared/data not present")


def test_option_parsing():
    assert parse_options(["r=50", "layers=3,6,9", "threshold=7e-5", "fuse=false", "threshold2=scaled"]) == {
        "r": 50, "layers": (3, 6, 9), "threshold": 7e-5, "fuse": False, "threshold2": "scaled"}
    assert parse_spec("tome:r=(13,0.5)") == Spec("tome", "r=(13,0.5)", {"r": (13, 0.5)})
    assert parse_spec("ppt:r=10:threshold=scaled") == Spec("ppt", "r=10 threshold=scaled", {"r": 10, "threshold": "scaled"})
    assert parse_spec("none") == Spec("none", "default", {})
    # what a spec runs on is not a method option
    assert parse_spec("dynamicvit:keep_rate=0.6:checkpoint=ft.safetensors") == Spec(
        "dynamicvit", "keep_rate=0.6 checkpoint=ft.safetensors", {"keep_rate": 0.6}, checkpoint="ft.safetensors")
    assert parse_spec("prance:model=cifar10_vit12_w128_prance").model == "cifar10_vit12_w128_prance"
    with pytest.raises(ValueError, match="checkpoint= takes a file"):
        parse_spec("none:checkpoint=3")
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["r50"])


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory):
    """A DeiT-T checkpoint with a 10-class head (random weights) as safetensors."""
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_data
def test_eval_imagenette_json(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(["eval", "--model", "deit_tiny_patch16_224", "--data", str(IMAGENETTE),
                              "--method", "ppt", "--opt", "r=50", "--limit", "8", "--batch-size", "4",
                              "--workers", "0", "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    for key in ("top1", "gmacs", "images_per_second", "n_images", "skipped"):
        assert key in result
    assert result["n_images"] == 8 and result["skipped"] == 0
    assert result["gmacs"] == pytest.approx(0.798, abs=0.01)  # DeiT-T PPT r=50
    assert result["dense"]["gmacs"] == pytest.approx(1.254, abs=0.01)
    assert 0.0 <= result["top1"] <= 100.0 and result["images_per_second"] > 0
    assert "prune_fraction_per_layer" in result["extra"]
    assert "dense" in out and "ppt" in out and "policy mix" in out


def test_eval_cifar_with_checkpoint(cifar_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(["eval", "--model", "deit_tiny_patch16_224", "--checkpoint", str(cifar_checkpoint),
                              "--data", str(CIFAR), "--split", "test", "--method", "tome", "--opt", "r=4",
                              "--limit", "10", "--batch-size", "5", "--workers", "0", "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["n_images"] == 10 and result["gmacs"] < result["dense"]["gmacs"]


def test_bench_json(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    code, out, err = run_cli(["bench", "--model", "vit_tiny_patch16_224", "--methods", "tome:r=8", "random:keep_rate=0.5",
                              "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--threads", "1",
                              "--json", str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["settings"]["threads"] == 1 and r["settings"]["batch_size"] == 2 and r["settings"]["repeats"] == 2
    assert set(r["methods"]) == {"tome:r=8", "random:keep_rate=0.5"}
    for m in r["methods"].values():
        assert len(m["seconds"]) == 2 and m["gmacs"] < r["dense"]["gmacs"]
        assert m["efficiency"] == pytest.approx(m["speedup"] / m["gmacs_ratio"])
        assert m["decision_overhead_ms"] == pytest.approx(
            1000 * (sorted(m["seconds"])[0] + sorted(m["seconds"])[1]) / 2
            - 1000 * (sorted(m["floor_seconds"])[0] + sorted(m["floor_seconds"])[1]) / 2)


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "deit_smal_patch16_224", "--data", "x"], "unknown model 'deit_smal_patch16_224'; did you mean"),
    (["eval", "--model", "deit_tiny_patch16_224", "--data", ".", "--method", "fancy"], "unknown method 'fancy'"),
    (["eval", "--model", "deit_tiny_patch16_224", "--data", ".", "--method", "ppt", "--opt", "q=1"], "no option 'q'"),
    (["eval", "--model", "deit_tiny_patch16_224", "--data", ".", "--method", "evit", "--opt", "keep_rate=2"],
     "keep_rate must be in"),
    (["eval", "--model", "deit_tiny_patch16_224", "--data", "/no/such/dir"], "does not exist"),
    (["eval", "--model", "resnet18", "--data", "."], "timm VisionTransformer"),
    (["eval", "--model", "deit_tiny_patch16_224", "--checkpoint", "/no/such.safetensors", "--data", "."],
     "does not exist"),
    (["bench", "--model", "deit_tiny_patch16_224", "--methods", "tome", "--input-size", "3", "32", "32"],
     "expects 224x224 images, got 32x32"),
    (["train-policy", "--model", "deit_tiny_patch16_224", "--method", "ppt", "--out", "/tmp/x"], "trains rl4evit"),
    (["bench", "--model", "deit_tiny_patch16_224", "--methods", "tome:checkpoint=ft.safetensors"], "are for `leanvit sweep`"),
])
def test_errors(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert message in err


def test_not_a_dataset(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(["eval", "--model", "deit_tiny_patch16_224", "--data", str(tmp_path / "notes.txt")], capsys)
    assert code == 2 and "notes.txt" in err


def test_checkpoint_that_does_not_fit(cifar_checkpoint, capsys):
    code, _, err = run_cli(["eval", "--model", "deit_small_patch16_224", "--checkpoint", str(cifar_checkpoint),
                            "--data", "."], capsys)
    assert code == 2 and "does not fit deit_small_patch16_224" in err


def test_pretrained_without_network(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as here: no network; fails at once, not after retries
    code, _, err = run_cli(["eval", "--model", "deit_tiny_patch16_224", "--pretrained", "--data", "."], capsys)
    assert code == 2
    assert "--checkpoint PATH" in err and "deit_tiny_patch16_224" in err


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "leanvit", "methods"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["ats", "channels", "dynamicvit", "evit", "none", "ppt", "prance", "random", "rl4evit", "tome"]


def test_wrong_image_size_python_api():
    import leanvit
    model = timm.create_model("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="expects 224x224 images, got 32x32"):
        leanvit.adapt(model, "ppt")(torch.randn(1, 3, 32, 32))


def test_sweep_writes_table_json_and_plots(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(["sweep", "--model", "vit12_convstem_w96_cifar", "--data", str(CIFAR),
                                 "--methods", "tome:r=2", "tome:r=4", "ppt:r=10:threshold=scaled", "evit:keep_rate=0.5",
                                 "--limit", "40", "--batch-size", "20", "--workers", "0", "--out", str(out),
                                 "--shuffled-floor"], capsys)
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    assert result["n_images"] == 40 and len(result["rows"]) == 4
    for r in result["rows"]:  # --shuffled-floor implies --random-floor: random tokens at each method's counts
        for floor in ("random_floor", "shuffled_floor"):  # ... and those counts dealt to other images: same MACs
            assert r[floor]["gmacs"] == pytest.approx(r["gmacs"], rel=1e-6)
            assert set(r["vs_" + floor]) >= {"kl_to_dense", "kl_to_dense_ci95", "agreement", "top1"}
    assert "KL - floor" in (out / "table.txt").read_text() and "KL - floor" in stdout
    assert "random floor:" in stdout and "shuffled floor:" in stdout
    by_label = {(r["method"], r["label"]): r for r in result["rows"]}
    assert by_label[("tome", "r=4")]["gmacs"] < by_label[("tome", "r=2")]["gmacs"] < result["dense"]["gmacs"]
    assert by_label[("ppt", "r=10 threshold=scaled")]["extra"]["prune_fraction_per_layer"].keys() == {"3", "6", "9"} \
        or by_label[("ppt", "r=10 threshold=scaled")]["extra"]["prune_fraction_per_layer"].keys() == {3, 6, 9}
    for png in ("pareto.png", "token_maps.png"):
        w, h = Image.open(out / png).size
        assert w > 300 and h > 200
    assert "tome" in stdout and "vs dense" in stdout


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_stays_inert(tmp_path, capsys):
    """--checkpoint reads torch files with weights_only=True: a pickle that would run code is refused."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, bad)
    code, out, err = run_cli(["eval", "--model", "vit12_convstem_w96_cifar", "--checkpoint", str(bad),
                              "--data", "cifar10-sample", "--limit", "4"], capsys)
    assert code == 2 and "cannot read checkpoint" in err and "weights_only=True" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_config_field_shadows_a_nested_one_of_the_same_name():
    """--entropy-coef of train-selector is the selector's own field, even if PPO's becomes an option."""
    import argparse
    from dataclasses import dataclass, field
    from leanvit.cli import add_config_args, config_from
    from leanvit.options import arg, nonnegative

    @dataclass
    class Inner:
        entropy_coef: float = arg(0.0, nonnegative)
        clip: float = arg(0.2, nonnegative)

    @dataclass
    class Outer:
        entropy_coef: float = arg(0.01, nonnegative)
        inner: Inner = field(default_factory=Inner)

    p = argparse.ArgumentParser()
    add_config_args(p, Outer)  # no argparse conflict
    cfg = config_from(Outer, p.parse_args(["--entropy-coef", "0.5", "--clip", "0.3"]))
    assert cfg.entropy_coef == 0.5 and cfg.inner == Inner(entropy_coef=0.0, clip=0.3)


def test_train_selector_and_train_policy_keep_ppo_epochs():
    """--ppo-epochs (PPO's epochs) is not shadowed by the trainings' own --epochs."""
    from leanvit.cli import build_parser
    p = build_parser()
    for cmd in ("train-selector", "train-policy"):
        args = p.parse_args([cmd, "--model", "m", "--out", "o", "--ppo-epochs", "10", "--epochs", "2"])
        assert args.ppo_epochs == 10 and args.epochs == 2
