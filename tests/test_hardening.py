"""Bad input of every kind, for every command: one line on stderr, exit code 2, no traceback.

A generated matrix (every numeric option of every command with out-of-range and non-numbers,
bad method options, bad paths), corrupt files, folder walks, the run-directory lock. Everything
runs in-process (``leanvit.cli.main``) and fails before any real work, so the file stays fast.
"""
import argparse
import fcntl
import io
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import CIFAR
from leanvit import cli, commands
from leanvit.cli import main, parse_options
from leanvit.data import EMBEDDED_CIFAR10, DataError, check_classes, load_dataset

MODEL = "vit12_convstem_w96_cifar"  # random weights, 32x32: built in milliseconds
SHIPPED = "cifar10_vit12_w128"
NOT_WRITABLE = Path("/proc/leanvit-nowhere")  # /proc takes no new files, even from root

# every command, with the arguments it needs so that the case at hand is the only problem
BASE = {
    "eval": ["--model", MODEL, "--data", "cifar10-sample", "--workers", "0"],
    "bench": ["--model", MODEL, "--methods", "tome:r=1"],
    "train": ["--model", MODEL, "--out", "{out}"],
    "train-supernet": ["--model", MODEL, "--out", "{out}"],
    "train-selector": ["--model", MODEL, "--out", "{out}"],
    "train-policy": ["--model", MODEL, "--out", "{out}"],
    "methods": [],
    "models": [],
    "sweep": ["--model", MODEL, "--methods", "tome:r=1", "--out", "{out}"],
    "demo": ["--out", "{out}"],
    "compare": ["{out}/results.json", "--gmacs", "0.1"],
    "match": ["--model", MODEL, "--of-dense", "0.5"],
    "export": ["--model", MODEL, "--out", "{out}/model.onnx"],
}
# values each kind of numeric option must refuse
BAD = {
    cli.positive_int: ["0", "-1", "2.5", "x", "1e999"],
    cli.natural: ["-1", "2.5", "x"],
    cli.positive: ["0", "-1e-3", "nan", "inf", "x"],
    cli.nonnegative: ["-1", "nan", "-inf", "x"],
    cli.fraction: ["0", "1.5", "nan", "x"],
    cli.unit: ["-0.1", "1.1", "nan"],
    cli.below_one: ["1", "-0.5", "inf"],
}


def _commands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_matrix_covers_every_command():
    assert set(_commands()) == set(BASE)


def _numeric_cases():
    for name, parser in _commands().items():
        for action in parser._actions:
            if action.type in BAD:
                for bad in BAD[action.type]:
                    yield pytest.param(name, action, bad, id=f"{name} {action.option_strings[0]} {bad}")


def _expect_error(argv, capsys, *messages, code=2):
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == code, (argv, rc, err)
    assert "Traceback" not in err + captured.out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line: the problem and the fix
    for m in messages:
        assert m in err, (m, err)
    return err


def _argv(command, tmp_path, *extra):
    return [command] + [a.format(out=tmp_path / "out") for a in BASE[command]] + list(extra)


def test_every_numeric_option_is_range_checked():
    """No numeric option of any command takes argparse's bare int/float: each has a range."""
    for name, parser in _commands().items():
        for action in parser._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}"


@pytest.mark.parametrize("command, action, bad", list(_numeric_cases()))
def test_bad_numbers_are_refused_before_anything_runs(command, action, bad, tmp_path, capsys):
    opt = action.option_strings[0]
    # --opt=VALUE: argparse would take "-1e-3" given on its own for an option name
    given = [opt, *[bad] * action.nargs] if isinstance(action.nargs, int) else [f"{opt}={bad}"]
    _expect_error(_argv(command, tmp_path, *given), capsys, f"argument {opt}", "must be", "--help")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(BASE))
def test_unknown_flag(command, tmp_path, capsys):
    _expect_error(_argv(command, tmp_path, "--no-such-flag"), capsys, "unrecognized arguments: --no-such-flag")


# --- method options: at the CLI's own parser, or from the method, as one line ---------------------
OPTS = {  # command -> (how options are given, bad options, what the error says)
    "eval": ["--method", "tome", "--opt"],
    "train": ["--method", "tome", "--opt"],
    "train-supernet": ["--opt"],
    "train-selector": ["--opt"],
    "train-policy": ["--opt"],
    "export": ["--method", "tome", "--opt"],
}
NOT_FINITE = ["r=1e999", "r=nan", "r=-inf", "r=(2,inf)", "r=[1,-Infinity]"]


@pytest.mark.parametrize("command", sorted(OPTS) + ["bench", "sweep"])
@pytest.mark.parametrize("opt", NOT_FINITE)
def test_non_finite_method_options(command, opt, tmp_path, capsys):
    if command in OPTS:
        argv = _argv(command, tmp_path, *OPTS[command], opt)
    else:
        argv = _argv(command, tmp_path)
        argv[argv.index("tome:r=1")] = f"tome:{opt}"
    _expect_error(argv, capsys, "must be finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "tome", "--opt", "r"], "is not key=value"),
    (["--method", "tome", "--opt", "r=-3"], "r must be an integer >= 0"),
    (["--method", "tome", "--opt", "r=2.5"], "r must be an integer"),
    (["--method", "tome", "--opt", "q=1"], "no option 'q'"),
    (["--method", "evit", "--opt", "keep_rate=0"], "keep_rate must be in"),
    (["--method", "evit", "--opt", "keep_rate=nan"], "must be finite"),
    (["--method", "ppt", "--opt", "layers=99"], "layers"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_bad_method_options(argv, message, tmp_path, capsys):
    _expect_error(_argv("eval", tmp_path, *argv), capsys, message)


def test_parse_options_refuses_non_finite_numbers():
    for text in NOT_FINITE + ["keep_rate=NaN", "x=Infinity"]:
        with pytest.raises(ValueError, match="must be finite"):
            parse_options([text])
    assert parse_options(["r=13", "name=nano", "layers=3,6,9"]) == {"r": 13, "name": "nano", "layers": (3, 6, 9)}


# --- paths -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "notes.txt").write_text("hello\n")
    (d / "empty").mkdir()
    (d / "garbage.safetensors").write_bytes(os.urandom(256))
    (d / "garbage.pt").write_bytes(b"PK\x03\x04" + os.urandom(300))  # looks like a zip: torch's format
    blob = EMBEDDED_CIFAR10.read_bytes()
    (d / "cut.tar.gz").write_bytes(blob[: len(blob) // 2])
    tar = CIFAR.read_bytes()
    (d / "cut.tar").write_bytes(tar[:5000])  # ends between two members: tarfile itself says nothing
    return d


DATA_COMMANDS = ["eval", "bench", "train", "train-supernet", "train-selector", "train-policy", "sweep", "demo"]


@pytest.mark.parametrize("command", DATA_COMMANDS)
@pytest.mark.parametrize("data, message", [
    ("missing", "does not exist"),
    ("notes.txt", "not a tar archive"),
    ("empty", "no images found"),
    ("cut.tar.gz", "is truncated or corrupt"),
    ("cut.tar", "is truncated or corrupt"),
])
def test_bad_data(command, data, message, files, tmp_path, capsys):
    argv = _argv(command, tmp_path, "--data", str(files / data))
    if command == "bench":
        argv += ["--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    err = _expect_error(argv, capsys, message)
    assert str(files / data) in err


MODEL_COMMANDS = ["eval", "bench", "train", "train-supernet", "train-selector", "train-policy", "sweep", "export"]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("checkpoint, message", [
    ("missing.safetensors", "does not exist"),
    ("garbage.safetensors", "cannot read checkpoint"),
    ("garbage.pt", "cannot read checkpoint"),
    ("notes.txt", "cannot read checkpoint"),
])
def test_bad_checkpoint(command, checkpoint, message, files, tmp_path, capsys):
    _expect_error(_argv(command, tmp_path, "--checkpoint", str(files / checkpoint)), capsys, message)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_unknown_model(command, tmp_path, capsys):
    argv = _argv(command, tmp_path)
    argv[argv.index(MODEL)] = "vit12_convstem_w69_cifar"
    _expect_error(argv, capsys, "unknown model", "did you mean")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as building a model or reading data."""
    def refuse(*a, **kw):
        raise AssertionError("work started before the output path was checked")
    monkeypatch.setattr("leanvit.models.create_model", refuse)
    monkeypatch.setattr("leanvit.models.load_model", refuse)
    monkeypatch.setattr("leanvit.data.load_dataset", refuse)


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_json_paths_are_checked_before_work(command, files, tmp_path, capsys, no_work):
    _expect_error(_argv(command, tmp_path, "--json", str(files)), capsys, "is a directory", "result.json")
    _expect_error(_argv(command, tmp_path, "--json", str(files / "notes.txt" / "r.json")), capsys,
                  "notes.txt is a file, not a directory")
    _expect_error(_argv(command, tmp_path, "--json", str(NOT_WRITABLE / "r.json")), capsys, "cannot be written")


@pytest.mark.parametrize("command", ["train", "train-supernet", "train-selector", "train-policy", "sweep", "demo"])
def test_out_paths_are_checked_before_work(command, files, tmp_path, capsys, no_work):
    def argv(out):
        a = _argv(command, tmp_path)
        a[a.index(str(tmp_path / "out"))] = str(out)
        return a
    _expect_error(argv(files / "notes.txt"), capsys, "notes.txt is a file, not a directory")
    _expect_error(argv(files / "notes.txt" / "run"), capsys, "notes.txt is a file, not a directory")
    _expect_error(argv(NOT_WRITABLE / "run"), capsys, "cannot be written")


def test_export_out_is_checked_before_work(files, tmp_path, capsys, no_work):
    _expect_error(["export", "--model", MODEL, "--out", str(files)], capsys, "is a directory", "model.onnx")
    _expect_error(["export", "--model", MODEL, "--out", str(files / "notes.txt" / "m.onnx")], capsys,
                  "notes.txt is a file, not a directory")
    _expect_error(["export", "--model", MODEL, "--out", str(NOT_WRITABLE / "m.onnx")], capsys, "cannot be written")


@pytest.mark.parametrize("method, why", [("ats", "per-image number of tokens"), ("random", "use fixed=true")])
def test_export_refuses_per_image_methods(method, why, tmp_path, capsys):
    _expect_error(["export", "--model", MODEL, "--method", method, "--out", str(tmp_path / "m.onnx")], capsys,
                  f"method {method!r} cannot be exported with static shapes", why)
    assert not (tmp_path / "m.onnx").exists()


def test_out_in_a_read_only_folder(tmp_path, capsys, no_work):
    """A folder without write permission; root writes into any folder, so there it is a /proc one."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    where = NOT_WRITABLE if os.geteuid() == 0 else ro
    try:
        _expect_error(_argv("train", tmp_path)[:-1] + [str(where / "run")], capsys, "cannot be written")
    finally:
        ro.chmod(0o700)


# --- corrupt and mismatched weights ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["rl4evit", "dynamicvit", "prance"])
def test_weights_option_must_be_safetensors(method, files, tmp_path, capsys):
    for name in ("garbage.safetensors", "notes.txt", "empty"):
        _expect_error(_argv("eval", tmp_path, "--method", method, "--opt", f"weights={files / name}"), capsys,
                      f"weights={files / name}", "not a safetensors file")


def test_wrong_architecture_weights_for_a_shipped_model(tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    model = commands._load(argparse.Namespace(model=MODEL, checkpoint=None, pretrained=False, num_classes=None,
                                              threads=None, device="cpu", amp="off"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other))
    err = _expect_error(["eval", "--model", SHIPPED, "--checkpoint", str(other), "--data", "cifar10-sample"],
                        capsys, f"checkpoint {other} does not fit {SHIPPED}", "shape differs")
    assert len(err) < 1000  # a summary, not torch's list of every key


def test_corrupt_resume_checkpoint_names_the_file_and_restart(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((files / "garbage.pt").read_bytes())
    train = ["train", "--model", MODEL, "--out", str(out), "--data", str(CIFAR), "--limit-train", "20",
             "--limit-eval", "10", "--batch-size", "10", "--epochs", "1", "--max-steps", "1", "--workers", "0"]
    _expect_error(train, capsys, str(out / "last.pt"), "is corrupt", "remove it, or pass --restart")
    assert main(train + ["--restart"]) == 0, capsys.readouterr().err  # the way out works
    assert (out / "final.safetensors").is_file()
    _assert_unlocked(out)  # released on success


# --- the lock on a run directory ------------------------------------------------------------------
def _assert_unlocked(out: Path):
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held


@pytest.mark.parametrize("command", ["train", "train-supernet", "train-selector", "train-policy", "sweep", "demo"])
def test_second_run_into_one_out_stops_at_once(command, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    planted = out / "last.pt"
    planted.write_bytes(b"the first run's checkpoint")
    with open(out / ".lock", "a+") as held:  # a first run, in the middle of its work
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        extra = ["--restart"] if command.startswith("train") else []
        _expect_error(_argv(command, tmp_path, *extra), capsys, "another leanvit run (pid 4242)",
                      f"is writing into {out}", "another --out")
    assert planted.read_bytes() == b"the first run's checkpoint"  # --restart did not remove it
    assert sorted(p.name for p in out.iterdir()) == [".lock", "last.pt"]


def test_lock_is_released_when_a_run_fails(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _expect_error(["train", "--model", MODEL, "--out", str(out), "--data", str(tmp_path / "missing")], capsys,
                  "does not exist")
    _assert_unlocked(out)
    fresh = tmp_path / "fresh"  # a failed run leaves no directory it made behind
    _expect_error(["train", "--model", MODEL, "--out", str(fresh), "--data", str(tmp_path / "missing")], capsys,
                  "does not exist")
    assert not fresh.exists()


# --- --debug and real bugs --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path, capsys):
    argv = ["eval", "--model", MODEL, "--data", str(tmp_path / "missing")]
    argv = ["--debug"] + argv if where == "before" else argv + ["--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and f"{DataError.__module__}.DataError" in err
    assert err.strip().splitlines()[-1].startswith(f"leanvit: error: data path {tmp_path / 'missing'} does not exist")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli, "cmd_methods", broken)
    with pytest.raises(ZeroDivisionError):
        main(["methods"])


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0 and "usage: leanvit" in capsys.readouterr().out
    assert main(["eval", "--help"]) == 0 and "--debug" in capsys.readouterr().out


def test_max_steps_zero_is_refused_in_the_api(tmp_path):
    from leanvit.train import TrainConfig, train
    for field in ("max_steps", "save_every", "batch_size", "epochs"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got 0"):
            train(TrainConfig(model=MODEL, out=str(tmp_path / "run"), **{field: 0}))


# --- folder walks and class names ----------------------------------------------------------------
def _image_folder(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(root / c / f"{i}.png")
    return root


def test_symlink_loops_are_not_followed(tmp_path, caplog):
    root = _image_folder(tmp_path / "data")
    (root / "cat" / "again").symlink_to(root / "cat")  # a loop: cat/again/again/... is cat
    (root / "dog" / "sub").mkdir()
    Image.new("RGB", (32, 32)).save(root / "dog" / "sub" / "x.png")
    (root / "dog" / "up").symlink_to(root)  # a link to an ancestor: would read everything again
    with caplog.at_level(logging.WARNING, logger="leanvit.data"):
        ds = load_dataset(root)
    assert len(ds) == 7 and ds.classes == ["cat", "dog"]  # 3 + 3 + 1, each image once
    assert len(set(map(os.path.realpath, ds.paths))) == 7
    assert sorted(s.split(" ")[0] for s in ds.skipped_folders) == [str(root / "cat" / "again"),
                                                                   str(root / "dog" / "up")]
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_unreadable_folders_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    root = _image_folder(tmp_path / "data", classes=("cat", "dog", "eel"))
    (root / "dog" / "locked").mkdir()
    Image.new("RGB", (32, 32)).save(root / "dog" / "locked" / "x.png")
    real_scandir = os.scandir
    locked = {str(root / "eel"), str(root / "dog" / "locked")}

    def scandir(path="."):  # what chmod 000 does for a user that is not root
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="leanvit.data"):
        ds = load_dataset(root)
    assert ds.classes == ["cat", "dog", "eel"]  # labels keep their indices
    assert len(ds) == 6 and len(ds.skipped_folders) == 2
    assert all("unreadable" in s for s in ds.skipped_folders)
    assert any("skipped 2 folder(s)" in r.getMessage() for r in caplog.records)
    assert ds.subset([0]).skipped_folders == ds.skipped_folders


def test_unreadable_data_root_is_a_data_error(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "data")
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if os.fspath(p) == str(root) else real_scandir(p))
    with pytest.raises(DataError, match="cannot read the folder"):
        load_dataset(root)


def test_eval_refuses_data_whose_classes_are_not_the_models_labels(tmp_path, capsys):
    root = _image_folder(tmp_path / "digits", classes=[f"c{i}" for i in range(10)], per_class=1)
    _expect_error(["eval", "--model", SHIPPED, "--data", str(root), "--workers", "0"], capsys,
                  "are not the model's labels (airplane, automobile", "rename the folders")


def test_eval_reports_skipped_folders(tmp_path, capsys):
    import json
    root = _image_folder(tmp_path / "data", classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                     "horse", "ship", "truck"), per_class=1)
    (root / "cat" / "loop").symlink_to(root / "cat")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", SHIPPED, "--data", str(root), "--workers", "0", "--json", str(out)]) == 0
    assert "1 folders skipped" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["skipped_folders"]) == 1


def test_trainings_warn_about_other_class_names(caplog):
    with caplog.at_level(logging.WARNING, logger="leanvit.data"):
        check_classes(["a", "b"], ["cat", "dog"], "DATA", strict=False)
    assert "not the model's labels" in caplog.text and "relearns" in caplog.text
    with pytest.raises(DataError, match="rename the folders"):
        check_classes(["a", "b"], ["cat", "dog"], "DATA")
    check_classes(["Cat", "dog"], ["cat", "dog"], "DATA")  # case does not matter
    check_classes(["a", "b"], None, "DATA")  # a model that does not say: nothing to compare


def test_truncated_archives_anywhere(tmp_path):
    """Cut the archive at many places: every cut is a DataError naming the file, never a short read."""
    blob = CIFAR.read_bytes()
    for cut in range(1000, len(blob) - 10240, len(blob) // 23):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(blob[:cut])
        with pytest.raises(DataError, match=f"{path} is truncated or corrupt"):
            load_dataset(path, split="test")
        path.unlink()
    gz = EMBEDDED_CIFAR10.read_bytes()
    for cut in (20, 4096, len(gz) // 3, len(gz) - 100):
        path = tmp_path / "cut.tar.gz"
        path.write_bytes(gz[:cut])
        with pytest.raises(DataError, match="is truncated or corrupt"):
            load_dataset(path, split="test")


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", MODEL, "--data", "cifar10-sample", "--json", ""], "argument --json: must be a path"),
    (["train", "--model", MODEL, "--out", ""], "argument --out: must be a path"),
    (["eval", "--model", MODEL, "--data", ""], "argument --data: must be a path"),
    (["bench", "--model", MODEL, "--methods", "tome:r=1:r=2"], "option r is given twice"),
    (["eval", "--model", MODEL, "--data", "cifar10-sample", "--method", "tome", "--opt", "r=1", "--opt", "r=2"],
     "option r is given twice"),
    (["eval", "--model", SHIPPED, "--num-classes", "5", "--data", "cifar10-sample"],
     "reference model with 10 classes; --num-classes 5 does not apply"),
    (["eval", "--model", MODEL, "--checkpoint", "{tmp}", "--data", "cifar10-sample"], "is a directory"),
])
def test_inputs_that_used_to_pass_silently(argv, message, tmp_path, capsys):
    _expect_error([a.format(tmp=tmp_path) for a in argv], capsys, message)
    assert not (Path.cwd() / "last.pt").exists()
