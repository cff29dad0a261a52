"""Weights, options and files a user or a file names are checked before anything runs: weights are
floating point and finite, a learned method's file runs only on the model it was trained for,
options are integers where they must be and sizes are bounded before anything is allocated, and a
result never holds a bare NaN. Each refusal is one line naming the file or option."""
import json
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import leanvit
from leanvit.cli import main
from leanvit.methods.base import TRAINED_FOR, TRAINED_FOR_WEIGHTS, OptionError, file_metadata
from leanvit.models import ModelError, load_model, weights_sketch, sketch_difference
from leanvit.provenance import write_json
from leanvit.zoo import ZOO_DIR

from conftest import images, small_vit
from test_hardening import MODEL, SHIPPED, _expect_error

PRANCE_META = "cifar10_vit12_w128_prance"


# --- checkpoints: floating point and finite -------------------------------------------------------
def _shipped_weights():
    return load_file(str(ZOO_DIR / f"{SHIPPED}.safetensors"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_checkpoint_of_integers_is_refused(dtype, tmp_path, capsys):
    sd = _shipped_weights()
    sd["blocks.3.mlp.fc1.weight"] = sd["blocks.3.mlp.fc1.weight"].to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    _expect_error(["eval", "--model", SHIPPED, "--checkpoint", str(path), "--data", "cifar10-sample"], capsys,
                  str(path), "tensor blocks.3.mlp.fc1.weight", "not floating point")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_nan_or_inf_is_refused(bad, tmp_path, capsys):
    sd = _shipped_weights()
    sd["head.weight"][0, 0] = bad
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    for argv in (["eval", "--model", SHIPPED, "--checkpoint", str(path), "--data", "cifar10-sample"],
                 ["eval", "--model", SHIPPED, "--checkpoint", str(path), "--data", "cifar10-sample",
                  "--method", "tome", "--json", str(tmp_path / "r.json")]):
        _expect_error(argv, capsys, str(path), "tensor head.weight", "NaN or infinite")
    assert not (tmp_path / "r.json").exists()
    timm_path = tmp_path / "timm.pt"  # a torch file for a timm model: the same check
    model = small_vit()
    sd = model.state_dict()
    sd["pos_embed"] = torch.full_like(sd["pos_embed"], float("nan"))
    torch.save(sd, timm_path)
    with pytest.raises(ModelError, match="tensor pos_embed has .* NaN"):
        leanvit.create_model("vit_tiny_patch16_224", checkpoint=str(timm_path), img_size=32, patch_size=4,
                             embed_dim=64, depth=12, num_heads=4, num_classes=10)


def test_shipped_models_load_exactly_as_stored():
    model = load_model(SHIPPED)
    stored = _shipped_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, stored[k].to(v.dtype)), k
        assert v.dtype == torch.float32 or not stored[k].is_floating_point(), k


@pytest.mark.parametrize("method", ["rl4evit", "dynamicvit", "prance"])
def test_method_weights_nan_or_integer_are_refused(method, tmp_path):
    runner = leanvit.adapt(small_vit(), method)
    sd = {k: v.clone().contiguous() for k, v in runner.method.state_dict().items()}
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    nan, ints = dict(sd), dict(sd)
    nan[key] = sd[key].clone()
    nan[key].view(-1)[0] = float("nan")
    ints[key] = sd[key].to(torch.int8)
    for bad, message in ((nan, "NaN or infinite"), (ints, "not floating point")):
        path = tmp_path / f"{method}.safetensors"
        options = getattr(runner.method, "options_metadata", dict)()  # what a trained file stores
        save_file(bad, str(path), metadata=options or None)
        with pytest.raises(OptionError, match=f"{method}: .*{path}: tensor {key}.*{message}"):
            leanvit.adapt(small_vit(), method, weights=str(path))


# --- a learned method's file and the model it was trained for ---------------------------------------
@pytest.mark.parametrize("name, method, trained_for, other", [
    (PRANCE_META, "prance", PRANCE_META, SHIPPED),
    (SHIPPED, "rl4evit", SHIPPED, PRANCE_META),
])
def test_shipped_method_files_run_only_on_their_model(name, method, trained_for, other):
    with safe_open(str(ZOO_DIR / f"{name}.{method}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta[TRAINED_FOR] == trained_for
    assert sketch_difference(json.loads(meta[TRAINED_FOR_WEIGHTS]), weights_sketch(load_model(trained_for))) is None
    leanvit.adapt(load_model(trained_for), method, weights=name)  # its own model: loads
    with pytest.raises(OptionError, match=f"trained for {trained_for}, not for this model {other}"):
        leanvit.adapt(load_model(other), method, weights=name)


def test_prance_selector_on_another_model_is_refused_by_the_cli(capsys):
    _expect_error(["eval", "--model", SHIPPED, "--data", "cifar10-sample", "--method", "prance", "--opt",
                   f"weights={PRANCE_META}"], capsys, f"trained for {PRANCE_META}", f"not for this model {SHIPPED}")


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_the_trained_for_model_in_another_precision_is_the_same_model(cast):
    leanvit.adapt(load_model(PRANCE_META).to(cast), "prance", weights=PRANCE_META)


def test_a_written_method_file_records_its_model(tmp_path):
    """What the trainings write (``file_metadata``) refuses every other model, and old files still load."""
    model = small_vit(seed=0)
    runner = leanvit.adapt(model, "rl4evit", hidden=[16])
    meta = file_metadata(runner.method)
    assert meta[TRAINED_FOR] == "VisionTransformer" and meta["hidden"] == "[16]"
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in runner.method.state_dict().items()}, str(path), metadata=meta)
    leanvit.adapt(small_vit(seed=0), "rl4evit", weights=str(path))
    with pytest.raises(OptionError, match="not for this model VisionTransformer .*other values in tensor"):
        leanvit.adapt(small_vit(seed=1), "rl4evit", weights=str(path))
    with torch.no_grad():  # the same model after more training is another model
        model.head.weight.mul_(1.5)
    with pytest.raises(OptionError, match="other values in tensor head.weight"):
        leanvit.adapt(model, "rl4evit", weights=str(path))
    old = {k: v for k, v in meta.items() if k not in (TRAINED_FOR, TRAINED_FOR_WEIGHTS)}
    save_file(load_file(str(path)), str(path), metadata=old)  # written before files recorded a model
    leanvit.adapt(small_vit(seed=1), "rl4evit", weights=str(path))


# --- options: integers are integers, sizes bounded ---------------------------------------------------
@pytest.mark.parametrize("method, option", [("ppt", "layers=3.7,6.2"), ("evit", "layers=2.5"),
                                            ("random", "layers=3,6.5"), ("dynamicvit", "layers=3.7,6.2"),
                                            ("rl4evit", "layers=3.7,6.2"), ("ats", "layers=true")])
def test_fractional_layers_are_refused(method, option, tmp_path, capsys):
    _expect_error(["eval", "--model", MODEL, "--data", "cifar10-sample", "--method", method, "--opt", option],
                  capsys, f"{method}: layers must be a list of block indices (integers)")


@pytest.mark.parametrize("hidden", ["[10000000,10000000]", "[1e7,1e7]", "[0]", "[]", "[true]", "[20000,20000,20000]"])
def test_huge_policy_networks_are_refused_before_allocating(hidden, capsys, monkeypatch):
    allocated = []
    real = torch.nn.Linear.__init__
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda self, a, b, *k, **kw: (
        allocated.append(a * b), real(self, a, b, *k, **kw))[1])
    _expect_error(["eval", "--model", MODEL, "--data", "cifar10-sample", "--method", "rl4evit", "--opt",
                   f"hidden={hidden}"], capsys, "rl4evit: hidden")
    assert max(allocated, default=0) < 10 ** 8


def _policy_with_metadata(tmp_path, **meta):
    runner = leanvit.adapt(small_vit(), "rl4evit", hidden=[16])
    path = tmp_path / "policy.safetensors"
    stored = {**runner.method.options_metadata(), **meta}
    save_file({k: v.contiguous() for k, v in runner.method.state_dict().items()}, str(path), metadata=stored)
    return path


@pytest.mark.parametrize("meta, message", [
    (dict(hidden="[10000000, 10000000]"), "hidden must be a list of layer widths"),
    (dict(hidden="[60000, 60000]"), "parameters, over"),
    (dict(layers="[3.7, 6.2]"), "layers must be a list of block indices"),
    (dict(hidden="not json"), "stores hidden='not json' in its metadata, which is not JSON"),
    (dict(placement=""), "stores placement='' in its metadata, which is not JSON"),
])
def test_policy_metadata_is_validated_as_options_are(meta, message, tmp_path):
    path = _policy_with_metadata(tmp_path, **meta)
    with pytest.raises(OptionError, match=f"rl4evit: .*{message}" if "JSON" not in message else str(path)) as e:
        leanvit.adapt(small_vit(), "rl4evit", weights=str(path))
    assert message in str(e.value)


def test_seeds_beyond_64_bits_are_refused():
    for method in ("random", "prance"):
        with pytest.raises(OptionError, match="seed must be an integer in 0.."):
            leanvit.adapt(small_vit(), method, seed=2 ** 70, **({"random": True} if method == "prance" else {}))


# --- results: no bare NaN -------------------------------------------------------------------------
def test_a_result_with_nan_is_not_written(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match=r"r.json: the result's rows.1.top1 is not a finite number"):
        write_json(path, dict(rows=[dict(top1=1.0), dict(top1=float("nan"))]))
    assert not path.exists() and not list(tmp_path.iterdir())
    write_json(path, dict(rows=[dict(top1=1.0)]))
    assert json.loads(path.read_text()) == dict(rows=[dict(top1=1.0)])


# --- threads -----------------------------------------------------------------------------------------
def _in_threads(fn, n_threads=4):
    errors = []

    def run():
        try:
            fn()
        except Exception as e:  # pragma: no cover - shown by the assert
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_ppt_statistics_count_every_forward_of_every_thread():
    runner = leanvit.adapt(small_vit(sharp=3.0), "ppt", r=4, threshold="scaled")
    x = images(2)
    runner.method.reset_stats()

    def forwards():
        with torch.no_grad():
            for _ in range(15):
                runner(x)
    _in_threads(forwards)
    assert set(runner.method.seen_counts.values()) == {4 * 15 * 2}


@pytest.mark.parametrize("method, opts", [("random", dict(keep_rate=0.5)), ("random", dict(keep_rate=0.5, independent=False)),
                                          ("prance", dict(random=True))])
def test_random_draws_are_whole_per_forward_under_threads(method, opts):
    """Each forward draws its own seed from the method's stream: the outputs of forwards run in
    threads are those of the same number of forwards run one after another, in some order."""
    runner = leanvit.adapt(small_vit(sharp=3.0), method, **opts)
    x = images(3)
    n = 12
    runner.method.generator.manual_seed(0)
    with torch.no_grad():
        expected = sorted(runner(x).sum().item() for _ in range(n))
    runner.method.generator.manual_seed(0)
    got, lock = [], threading.Lock()

    def forwards():
        for _ in range(n // 4):
            with torch.no_grad():
                y = runner(x).sum().item()
            with lock:
                got.append(y)
    _in_threads(forwards)
    assert sorted(got) == pytest.approx(expected, rel=0, abs=1e-5)
