"""ONNX export: dense and every fixed-count method run in onnxruntime with PyTorch's logits (≤ 1e-4)
at any batch size (the batch axis is dynamic); per-image methods are refused with the reason."""
import pytest
import torch

from conftest import STATIC_METHODS, images, small_vit
from leanvit import adapt
from leanvit.cli import main

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'leanvit[export]'")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install 'leanvit[export]'")
pytest.importorskip("onnxruntime", reason="running the exported file needs onnxruntime: pip install 'leanvit[export]'")

from leanvit.export import ExportError, export_onnx, onnx_session, run_onnx  # noqa: E402

STATIC = {**STATIC_METHODS, "dynamicvit": dict(layers=(1, 2))}  # dynamicvit at inference is static


@pytest.mark.parametrize("name", list(STATIC))
def test_exported_logits_match_pytorch(name, tmp_path):
    runner = adapt(small_vit(depth=4, sharp=4.0), name, **STATIC[name])
    path = export_onnx(runner, tmp_path / f"{name}.onnx")
    session = onnx_session(path, threads=1)
    for batch in (3, 1, 5):  # not the batch it was exported with: the axis is dynamic
        x = images(batch, seed=batch)
        with torch.no_grad():
            ref = runner(x)
        out = run_onnx(session, x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= 1e-4, name


def test_ppt_mixed_batch_exports_both_branches(tmp_path):
    """A threshold between the images' variances: some prune, some pool, inside one exported graph;
    the export leaves the method's statistics as they were."""
    model = small_vit(depth=4, sharp=4.0)
    x = images(8)
    for threshold in (0.0, 1e-3, 1e-4, 1e-5, 1e-6):  # the first that mixes the batch
        runner = adapt(model, "ppt", r=8, layers=(1, 2), threshold=threshold)
        with torch.no_grad():
            ref = runner(x)
        if 0 < runner.method.prune_fraction()[1] < 1:
            break
    else:
        pytest.fail("no threshold mixed the batch")
    before = runner.method.prune_fraction()
    out = run_onnx(export_onnx(runner, tmp_path / "ppt.onnx"), x)
    assert (out - ref).abs().max() <= 1e-4
    assert runner.method.prune_fraction() == before


@pytest.mark.parametrize("name, options, why", [
    ("ats", {}, "per-image number of tokens"),
    ("rl4evit", dict(layers=(1, 2)), "per-image number of tokens"),
    ("random", dict(layers=(1, 2)), "use fixed=true"),
])
def test_per_image_methods_are_refused(name, options, why, tmp_path):
    runner = adapt(small_vit(depth=4), name, **options)
    with pytest.raises(ExportError, match=f"method '{name}' cannot be exported with static shapes: .*{why}"):
        export_onnx(runner, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_dynamicvit_in_training_mode_exports_its_inference(tmp_path):
    """Export runs the runner in eval mode (a fixed top-k) and puts its mode back."""
    runner = adapt(small_vit(depth=4), "dynamicvit", layers=(1, 2)).train()
    path = export_onnx(runner, tmp_path / "d.onnx")
    assert runner.training
    runner.eval()
    with torch.no_grad():
        assert (run_onnx(path, images(2)) - runner(images(2))).abs().max() <= 1e-4


def test_masked_runner_is_refused(tmp_path):
    runner = adapt(small_vit(depth=4), "evit", layers=(1, 2))
    runner.masked = True
    with pytest.raises(ExportError, match="masked"):
        export_onnx(runner, tmp_path / "m.onnx")


@pytest.mark.parametrize("model, opt, size", [
    ("vit12_convstem_w96_cifar", "r=2", 32),  # a reference architecture, random weights
    pytest.param("deit_tiny_patch16_224", "r=13", 224, marks=pytest.mark.slow),  # ~1 min
])
def test_cli_export(model, opt, size, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", model, "--method", "tome", "--opt", opt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and f"wrote {out}" in printed
    diff = float(printed.rsplit("difference| ", 1)[1])
    assert diff <= 1e-4
    torch.manual_seed(0)  # the command's random weights
    from leanvit.models import create_model
    runner = adapt(create_model(model), "tome", r=int(opt[2:]))
    x = images(2, size=size)
    with torch.no_grad():
        assert (run_onnx(out, x) - runner(x)).abs().max() <= 1e-4
