"""Nothing a user names is overwritten, and no command ends in a traceback: an output that is a
file the command reads is refused before any work; an existing file that is not a leanvit result is
replaced only with --force; compare checks its input; a full disk is one line and leaves no
temporary file; adapting an adapted model is refused; learned methods follow the model's dtype."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import leanvit
from leanvit.cli import main
from leanvit.methods.base import OptionError
from leanvit.zoo import ZOO_DIR

from conftest import CIFAR, images, small_vit
from test_hardening import MODEL, SHIPPED, _expect_error, no_work  # noqa: F401  (a fixture)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((ZOO_DIR / f"{SHIPPED}.safetensors").read_bytes())
    return path


def _eval(*extra):
    return ["eval", "--model", SHIPPED, "--data", "cifar10-sample", "--limit", "10", "--workers", "0", *extra]


# --- never overwrite an input ---------------------------------------------------------------------
def test_json_onto_the_checkpoint_is_refused_before_work(weights, tmp_path, capsys, no_work):
    before = weights.read_bytes()
    _expect_error(_eval("--checkpoint", str(weights), "--json", str(weights)), capsys,
                  f"--json {weights}", "is a file this command reads", "--checkpoint")
    alias = tmp_path / "sub" / ".." / "w.safetensors"  # another spelling of the same file
    (tmp_path / "sub").mkdir()
    _expect_error(_eval("--checkpoint", str(weights), "--json", str(alias), "--force"), capsys,
                  "is a file this command reads")
    hard = tmp_path / "hard.json"
    os.link(weights, hard)  # a hard link is the same file too
    _expect_error(_eval("--checkpoint", str(weights), "--json", str(hard), "--force"), capsys,
                  "is a file this command reads")
    assert weights.read_bytes() == before


@pytest.mark.parametrize("argv, option", [
    (["eval", "--model", MODEL, "--data", "{data}", "--json", "{data}"], "--data"),
    (["eval", "--model", MODEL, "--data", "cifar10-sample", "--method", "rl4evit", "--opt", "weights={data}",
      "--json", "{data}"], "weights="),
    (["bench", "--model", MODEL, "--methods", "tome:r=1", "--data", "{data}", "--json", "{data}"], "--data"),
    (["export", "--model", MODEL, "--checkpoint", "{data}", "--out", "{data}"], "--checkpoint"),
    (["compare", "{data}", "--gmacs", "0.1", "--plot", "{data}"], "results"),
    (["train", "--model", MODEL, "--checkpoint", "{out}/final.safetensors", "--out", "{out}"], "--checkpoint"),
    (["sweep", "--model", MODEL, "--methods", "tome:r=1", "--data", "{out}/results.json", "--out", "{out}"], "--data"),
])
def test_outputs_onto_any_input_are_refused(argv, option, tmp_path, capsys, no_work):
    data = tmp_path / "input.bin"
    data.write_bytes(b"an input the command reads")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("final.safetensors", "results.json"):
        (out / name).write_bytes(b"an input in the output folder")
    argv = [a.format(data=data, out=out) for a in argv]
    _expect_error(argv, capsys, "this command reads", option)
    assert data.read_bytes() == b"an input the command reads"
    assert (out / "final.safetensors").read_bytes() == b"an input in the output folder"


def test_json_onto_a_resume_checkpoint_needs_force(tmp_path, capsys):
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    torch.save({"step": 3}, last)
    before = last.read_bytes()
    _expect_error(_eval("--json", str(last)), capsys, f"--json {last}", "exists and is not a leanvit result",
                  "--force")
    assert last.read_bytes() == before
    assert main(_eval("--json", str(last), "--force")) == 0
    assert json.loads(last.read_text())["model"] == SHIPPED


def test_a_previous_result_is_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_eval("--json", str(out))) == 0
    assert main(_eval("--json", str(out), "--method", "tome", "--opt", "r=2")) == 0
    assert json.loads(out.read_text())["method"] == "tome"
    capsys.readouterr()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    _expect_error(["compare", str(out), "--gmacs", "0.1", "--plot", str(notes)], capsys, "not a leanvit result")
    assert notes.read_text() == "my notes"


# --- compare reads its input carefully ----------------------------------------------------------------
ROW = dict(method="tome", options={"r": 2}, gmacs=0.1, top1=50.0, label="r=2")


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not text"),
    (b"{not json", "is not JSON"),
    (json.dumps(dict(rows=[], dense=dict(gmacs=0.2, top1=60))).encode(), "no rows"),
    (json.dumps(dict(rows=[dict(ROW)], dense=dict(gmacs=0, top1=60))).encode(), "dense.gmacs must be a positive number"),
    (json.dumps(dict(rows=[dict(ROW)], dense=None)).encode(), "dense.gmacs must be a positive number"),
    (json.dumps(dict(rows=[{k: v for k, v in ROW.items() if k != "options"}], dense=dict(gmacs=0.2))).encode(),
     "rows[0] has no options"),
    (json.dumps(dict(rows=[dict(ROW), dict(ROW, gmacs="x")], dense=dict(gmacs=0.2))).encode(),
     "rows[1] gmacs must be a finite number"),
    (json.dumps(dict(rows=[dict(ROW, top1=None)], dense=dict(gmacs=0.2))).encode(), "rows[0] top1 must be"),
    (json.dumps([1, 2]).encode(), "no rows"),
])
@pytest.mark.parametrize("how", ["gmacs", "of-dense", "plot"])
def test_compare_names_the_file_and_the_field(content, message, how, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    extra = {"gmacs": ["--gmacs", "0.1"], "of-dense": ["--of-dense", "0.5"],
             "plot": ["--gmacs", "0.1", "--plot", str(tmp_path / "p.png")]}[how]
    _expect_error(["compare", str(path), *extra], capsys, str(path), message)


# --- a full disk ----------------------------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    from leanvit import training
    real = torch.save

    def full_disk(obj, f, *a, **kw):
        real(obj, f, *a, **kw)  # the bytes go out, then the disk is full (as torch reports it)
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 6912 vs 6900")
    monkeypatch.setattr(training.torch, "save", full_disk)
    out = tmp_path / "run"
    train = ["train", "--model", MODEL, "--out", str(out), "--data", str(CIFAR), "--limit-train", "20",
             "--limit-eval", "10", "--batch-size", "10", "--epochs", "1", "--max-steps", "1", "--workers", "0"]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"leanvit: error: could not write {out / 'last.pt'}") and "free disk space" in last
    assert not list(out.glob("*.tmp")) and not (out / "last.pt").exists()


def test_a_full_disk_during_a_json_write(tmp_path, monkeypatch, capsys):
    from pathlib import Path
    real = Path.write_text

    def full(self, text, *a, **kw):
        real(self, text[:10], *a, **kw)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "r.json"
    assert main(_eval("--json", str(out))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"leanvit: error: could not write {out}: No space left on device")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


# --- adapt, dtypes ------------------------------------------------------------------------------------------
def test_adapting_an_adapted_model_is_refused():
    model = small_vit(depth=4)
    tome = leanvit.adapt(model, "tome", r=4)
    with pytest.raises(OptionError, match="already adapted with tome.*adapt its .model"):
        leanvit.adapt(tome, "evit")
    with pytest.raises(OptionError, match="already adapted"):
        leanvit.adapt(tome, leanvit.build_method("evit"))
    assert leanvit.adapt(tome, "none").model is model  # its dense model: the one meaningful composition
    assert leanvit.adapt(leanvit.adapt(model, "none"), "evit", layers=(1,)).method.name == "evit"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method, opts", [("rl4evit", {}), ("prance", dict(strategy="prune")), ("dynamicvit", {}),
                                          ("prance", dict(strategy="prune-merge", state="keys"))])
def test_learned_methods_follow_a_model_cast_before_adapt(method, opts, dtype):
    model = small_vit(sharp=3.0).to(dtype)
    f = leanvit.adapt(model, method, **opts)
    assert all(p.dtype == dtype for p in f.method.parameters())
    with torch.no_grad():
        out = f(images(3).to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_shipped_learned_methods_run_in_bf16():
    for name, method in ((f"{SHIPPED}_prance", "prance"), (SHIPPED, "rl4evit")):
        f = leanvit.adapt(leanvit.load_model(name).bfloat16(), method, weights=name)
        with torch.no_grad():
            assert torch.isfinite(f(images(2).bfloat16())).all()


def test_the_cli_refuses_a_file_written_over_by_a_bad_policy_json(tmp_path, capsys):
    """A policy whose metadata is not JSON: one line naming the file and the key, from the CLI."""
    runner = leanvit.adapt(small_vit(), "rl4evit", hidden=[16])
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in runner.method.state_dict().items()}, str(path),
              metadata={**runner.method.options_metadata(), "layers": "[3, 6,"})
    _expect_error(["eval", "--model", MODEL, "--data", "cifar10-sample", "--method", "rl4evit", "--opt",
                   f"weights={path}"], capsys, str(path), "stores layers=", "not JSON")
