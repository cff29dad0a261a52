"""What a command writes never replaces what it reads: checked before any work, from the parsed
arguments. Every path in any argument (and in ``key=value`` options and method specs, and the
shipped files a name stands for) is an input; an output file that is one of them (however
spelled: links, ``..``, hard links), or an --out folder holding one, is refused. An existing
output file that is not of the kind leanvit writes there (its content, not its name) is replaced
only with ``--force``."""
from __future__ import annotations

import glob
import os
from pathlib import Path


class OutputError(ValueError):
    """An output path that would replace an input, or a file the user made."""


# dest -> (option, what leanvit writes there): the files a command writes
OUTPUT_FILES = {"json": ("--json", "json"), "onnx": ("--out", "onnx"), "plot": ("--plot", "png")}
COMPARISON_FILES = {"results.json": "json", "pareto.png": "png", "token_maps.png": "png", "table.txt": "text"}
KINDS = {"json": "a JSON object", "png": "a PNG image", "onnx": "an ONNX model", "text": "a text table"}


def _named_paths(dest: str, value) -> list:
    """(how the command line names it, text) of every path-like piece of an argument: the value
    itself, and the values of ``key=value`` options and ``method:key=value`` specs in it."""
    option = "results" if dest == "results" else f"--{dest.replace('_', '-')}"
    found = []
    for text in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(text, str) or not text:
            continue
        found.append((option, text))
        for piece in text.split(":"):
            key, eq, val = piece.partition("=")
            if eq and val:
                found.append((f"{key.strip()}=", val))
    return found


def command_inputs(args) -> list:
    """(option, path) of every file or folder the command reads: paths given in any argument
    (--data, --checkpoint, weights= and checkpoint= options, compare's results), the shipped files
    that names stand for (a reference model, a method's shipped weights, cifar10-sample)."""
    from .data import EMBEDDED_CIFAR10, SAMPLE_NAME
    from .zoo import ZOO_DIR
    inputs = []
    for dest, value in vars(args).items():
        if dest in OUTPUT_FILES or dest in ("out", "func", "command"):
            continue
        for option, text in _named_paths(dest, value):
            candidates = [Path(text).expanduser()]
            if text == SAMPLE_NAME:
                candidates.append(EMBEDDED_CIFAR10)
            if "/" not in text and text.strip() and not text.startswith("."):  # a shipped name
                candidates += sorted(ZOO_DIR.glob(f"{glob.escape(text)}.*safetensors"))
            inputs += [(option, p) for p in candidates if p.exists()]
    return inputs


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def check_no_overwrite(args) -> None:
    """Before any work: no output is a file the command reads (however spelled: links, ``..``,
    hard links), no input lies in an --out folder the command writes, and an existing output file
    that is not a leanvit result (by its content) is replaced only with --force."""
    inputs = command_inputs(args)
    outputs = [(option, Path(getattr(args, dest)), kind) for dest, (option, kind) in OUTPUT_FILES.items()
               if getattr(args, dest, None)]
    out = Path(args.out) if isinstance(getattr(args, "out", None), str) else None
    if out is not None and args.command in ("sweep", "demo"):
        outputs += [("--out", out / name, kind) for name, kind in COMPARISON_FILES.items()]
    for option, target, _ in outputs:
        for given, source in inputs:
            if target.exists() and (_same(target, source) or (source.is_dir() and _inside(target, source))):
                raise OutputError(f"{option} {target} is a file this command reads ({given} {source}); "
                                  "pass another output path")
    if out is not None:
        for given, source in inputs:
            if source.is_file() and _inside(source, out):
                raise OutputError(f"--out {out} holds {source}, a file this command reads ({given}); it could be "
                                  "overwritten: pass another --out, or move the file")
    if not getattr(args, "force", False):
        for option, target, kind in outputs:
            if target.is_file() and not _is_leanvit_output(target, kind):
                raise OutputError(f"{option} {target} exists and is not a leanvit result (not {KINDS[kind]}, what "
                                  "leanvit writes there); pass --force to replace it, or another path")


def _is_leanvit_output(path: Path, kind: str) -> bool:
    """Whether an existing file is of the ``kind`` leanvit writes there, so replacing it loses
    nothing the user made: a JSON object, a PNG image, an ONNX model, sweep's text table."""
    import json
    try:
        if kind == "png":
            with open(path, "rb") as f:
                return f.read(8) == b"\x89PNG\r\n\x1a\n"
        if kind == "text":  # table.txt, in the folder the sweep owns
            return path.stat().st_size < 1 << 20 and bool(path.read_bytes().decode("utf-8"))
        if kind == "onnx":
            import onnx
            onnx.load(str(path), load_external_data=False)
            return True
        return isinstance(json.loads(path.read_text()), dict)
    except Exception:  # unreadable, not text, not JSON, not ONNX: not a result leanvit wrote
        return False
