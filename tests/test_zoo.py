"""The shipped reference model: listed, loaded offline with its preprocessing, small, accurate,
and the demo runs on it."""
import json
import re
from pathlib import Path

import pytest
import torch

import leanvit
from conftest import CIFAR
from leanvit.cli import main
from leanvit.demo import DEMO_MODEL, PRANCE_MODEL, TESTBEDS
from leanvit.zoo import ZOO_DIR, list_method_weights

ROOT = Path(__file__).resolve().parents[1]



def test_reference_model_is_shipped_small_and_loads_offline():
    assert DEMO_MODEL in leanvit.list_models()
    weights = ZOO_DIR / f"{DEMO_MODEL}.safetensors"
    assert weights.stat().st_size <= 12 * 2**20
    card = (ZOO_DIR / f"{DEMO_MODEL}.md").read_text()
    assert "Top-1 on CIFAR-10 (JPEG) test, 10000 images" in card and "torchrun" in card
    model = leanvit.load_model(DEMO_MODEL)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32) and len(cfg["mean"]) == 3 and cfg["crop_pct"] == 1.0
    assert len(model.blocks) == 12 and model.patch_embed.num_patches + model.num_prefix_tokens == 65
    with torch.no_grad():
        assert leanvit.create_model(DEMO_MODEL)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_prance_meta_network_and_selector_are_shipped():
    """PRANCE for the reference model: the meta-network (a model of its own) and its selector,
    each small, loadable by name, with a card that names the commands that made them."""
    assert PRANCE_MODEL in leanvit.list_models() and PRANCE_MODEL in list_method_weights("prance")
    for f in (f"{PRANCE_MODEL}.safetensors", f"{PRANCE_MODEL}.prance.safetensors"):
        assert (ZOO_DIR / f).stat().st_size <= 12 * 2**20
    card = (ZOO_DIR / f"{PRANCE_MODEL}.md").read_text()
    recipes = re.findall(r"benchmarks/[\w/]+\.sh", card)
    assert {Path(r).name for r in recipes} >= {"prance_supernet.sh", "prance_selectors.sh"}
    assert all((ROOT / r).is_file() for r in recipes), recipes  # the commands it names exist
    fast = leanvit.adapt(leanvit.load_model(PRANCE_MODEL), "prance", weights=PRANCE_MODEL)
    assert fast.method.selector is not None and fast.method.fixed is None
    with torch.no_grad():
        assert fast(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_demo_on_the_reference_model(tmp_path, capsys, monkeypatch):
    """With no CIFAR-10 anywhere (a fresh machine), the demo runs on the sample shipped in the package."""
    monkeypatch.setattr("leanvit.data.find_default_cifar10", lambda: None)
    out = tmp_path / "demo"
    code = main(["demo", "--limit", "100", "--batch-size", "50", "--workers", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "using the 2,000 CIFAR-10 test images shipped with leanvit" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["n_images"] == 100 and result["model"] == DEMO_MODEL
    assert result["data"].endswith("cifar10-test-2000.tar.gz:test/")
    methods = {r["method"] for r in result["rows"]}
    assert {"tome", "evit", "ppt", "ats", "random", "rl4evit", "prance"} <= methods
    assert [r.get("model") for r in result["rows"] if r["method"] == "prance"] == [PRANCE_MODEL]
    assert result["dense"]["top1"] > 50.0  # a trained model, not chance (10%)
    for r in result["rows"]:
        assert r["gmacs"] < result["dense"]["gmacs"] * 1.001
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "token_maps.png").stat().st_size > 10_000
    assert "ppt" in printed and "vs dense" in printed


def test_demo_on_the_cluttered_testbed(tmp_path, capsys, monkeypatch):
    """`--testbed cluttered`: the cluttered reference model on cluttered images composed from the
    shipped sample, with the table of which tokens each method keeps."""
    monkeypatch.setattr("leanvit.data.find_default_cifar10", lambda: None)
    out = tmp_path / "demo"
    code = main(["demo", "--testbed", "cluttered", "--limit", "60", "--batch-size", "30", "--workers", "0",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == TESTBEDS["cluttered"] and result["n_images"] == 60
    assert result["data"].startswith("cluttered(") and "cifar10-test-2000" in result["data"]
    assert result["dense"]["top1"] > 30.0  # a trained model, not chance (10%)
    random = [r for r in result["rows"] if r["method"] == "random" and r["label"] == "keep=0.5"][0]
    recall = random["objects"]["object_recall"]
    assert 0.35 < recall[min(recall, key=int)] < 0.65  # random keeps about half of the object
    policy = [r for r in result["rows"] if r["method"] == "rl4evit"]  # the policy shipped for this model
    assert len(policy) == 1 and policy[0]["gmacs"] < 0.6 * result["dense"]["gmacs"]
    assert "which tokens each method keeps (object boxes)" in printed



def test_demo_testbed_follows_cluttered_data(tmp_path, capsys):
    """A cluttered --data runs the cluttered testbed; naming the CIFAR-10 testbed with it is refused."""
    assert main(["demo", "--testbed", "cifar10", "--data", "cluttered-cifar10-sample", "--out", str(tmp_path / "a")]) == 2
    assert "use --testbed cluttered" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main(["demo", "--data", "cluttered-cifar10-sample", "--limit", "20", "--workers", "0", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == TESTBEDS["cluttered"] and result["data"].startswith("cluttered(")


def test_demo_full_and_download_need_the_full_set(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("leanvit.data.find_default_cifar10", lambda: None)
    assert main(["demo", "--full", "--out", str(tmp_path / "a")]) == 2
    assert "--full needs the full CIFAR-10 test set" in capsys.readouterr().err
    assert main(["demo", "--full", "--data", "cifar10-sample", "--out", str(tmp_path / "b")]) == 2
    assert "the shipped sample has 2,000" in capsys.readouterr().err
    assert main(["demo", "--download", "--data", str(CIFAR), "--out", str(tmp_path / "c")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
