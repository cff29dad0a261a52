"""The one parser of the option and method-spec syntax the command line and the comparisons share.

    key=value                  one option: parse_options(["r=50", "layers=3,6,9"])
    name:key=value:key=value   a method with its options: parse_spec("ppt:r=10:threshold=scaled")

Also how a configuration field is given on the command line: :func:`arg` marks a dataclass
field with the check of its value (:data:`positive_int`, :func:`path`, ...) and its help;
:func:`add_config_args` makes one option of each such field, with the field's default, and
:func:`config_from` the configuration of the parsed options.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from dataclasses import MISSING, fields, is_dataclass, replace
import math
import re
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional


class Spec(NamedTuple):
    """One configuration of a comparison: a method, a label for its budget, its options, and
    the model it runs on when not the compared one: a shipped model (PRANCE runs on its
    meta-network) and/or a checkpoint of that model (a ViT fine-tuned with its method, as
    DynamicViT is), so that its fidelity is measured against the compared dense model."""

    method: str
    label: str
    options: dict
    model: Optional[str] = None
    checkpoint: Optional[str] = None


SPEC_KEYS = ("model", "checkpoint")  # keys of a spec that say what it runs on, not method options


def parse_value(text: str):
    """'50' -> 50, '0.7' -> 0.7, '3,6,9' -> (3, 6, 9), 'true' -> True, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _finite(value) -> bool:
    """No inf or nan anywhere in an option value ('1e999', 'nan', '(13, inf)')."""
    if isinstance(value, (list, tuple, set)):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, str):  # also the pieces of a list literal_eval could not read: '(2,inf)'
        return all(_finite(_float_or_none(piece)) for piece in re.split(r"[\s,()\[\]]+", value))
    return not isinstance(value, (float, complex)) or math.isfinite(abs(value))


def _float_or_none(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def _check_weights(key: str, value) -> None:
    """A local file given as method weights must be safetensors: say so here, naming the file."""
    if not isinstance(value, str) or not Path(value).exists():
        return  # a shipped model's name, or missing: the method says which weights it knows
    from safetensors import safe_open
    try:
        with safe_open(value, framework="pt"):
            pass
    except Exception as e:  # SafetensorError, IsADirectoryError, ...: not a readable safetensors file
        raise ValueError(f"option {key}={value}: not a safetensors file ({type(e).__name__}: {e}); pass the "
                         ".safetensors a leanvit training wrote, or a reference model's name") from None


def parse_options(pairs: List[str]) -> dict:
    opts = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"option {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        key, parsed = key.strip(), parse_value(value)
        if not _finite(parsed):
            raise ValueError(f"option {key}={value}: numbers must be finite (no inf or nan)")
        if key in opts:
            raise ValueError(f"option {key} is given twice ({key}={opts[key]!r} and {pair}); give it once")
        if key == "weights":
            _check_weights(key, parsed)
        opts[key] = parsed
    return opts


def parse_spec(text: str) -> Spec:
    """'ppt:r=10:threshold=scaled' -> Spec('ppt', 'r=10 threshold=scaled', {'r': 10, 'threshold': 'scaled'}).

    ``model=NAME`` (a shipped reference model) and ``checkpoint=FILE`` (weights for it, or for the
    compared model) say what the method runs on: 'dynamicvit:keep_rate=0.6:checkpoint=ft.safetensors'."""
    method, *pairs = text.split(":")
    options = parse_options(pairs)
    where = {k: options.pop(k) for k in SPEC_KEYS if k in options}
    for key, value in where.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{text}: {key}= takes a {'file' if key == 'checkpoint' else 'model name'}, got {value!r}")
    return Spec(method, " ".join(pairs) or "default", options, **where)


# --- configuration fields on the command line ------------------------------------------------------
def _bounded(cast, what: str, ok):
    """An argparse ``type=`` that accepts a finite ``cast(text)`` for which ``ok`` holds."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _bounded(int, "an integer >= 1", lambda v: v >= 1)
natural = _bounded(int, "an integer >= 0", lambda v: v >= 0)
positive = _bounded(float, "a number > 0", lambda v: v > 0)
nonnegative = _bounded(float, "a number >= 0", lambda v: v >= 0)
fraction = _bounded(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
unit = _bounded(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
below_one = _bounded(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def one_of(*names: str):
    """An argparse ``type=`` that accepts one of ``names``."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {text!r}")
        return text
    parse.__name__ = "one of " + ", ".join(names)
    return parse


def path(text: str) -> str:
    """A path option: an empty one would mean the current directory (``--out ""`` trained into it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return text


def arg(default=dataclasses.MISSING, check: Optional[Callable[[str], object]] = None, help: Optional[str] = None,
        flag: Optional[str] = None):
    """A dataclass field the command line takes: ``--<name>`` (``flag`` if given; ``--no-<name>``
    for a field that defaults to True), its value checked by ``check`` (None: any string; a bool
    field is a switch), with ``help``. No default: the option is required."""
    return dataclasses.field(default=default, metadata={"arg": dict(check=check, help=help, flag=flag)})


# --- configuration fields as command-line options ------------------------------------------------
def _field_default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_config_args(p, config, skip=()) -> None:
    """An option for every :func:`~leanvit.options.arg` field of the ``config`` dataclass but
    ``skip``, and of the configurations it holds (PPO's), with the field's default, check and help;
    a nested field's value goes to ``<field>_<name>``. A field of ``config`` itself shadows a nested
    one with the same option."""
    own = {_flag(f, _field_default(f)) for f in fields(config) if "arg" in f.metadata}
    for f in fields(config):
        default = _field_default(f)
        if is_dataclass(default):
            for g in fields(default):
                if "arg" in g.metadata and _flag(g, getattr(default, g.name)) not in own:
                    _add_field(p, g, getattr(default, g.name), dest=f"{f.name}_{g.name}")
        elif "arg" in f.metadata and f.name not in skip:
            _add_field(p, f, default, dest=f.name)


def _flag(f, default) -> str:
    """The option of a field: ``--<name>``, ``--no-<name>`` for a switch that defaults to True, or its flag."""
    name = f.name.replace("_", "-")
    return f.metadata["arg"]["flag"] or (f"--no-{name}" if default is True else f"--{name}")


def _add_field(p, f, default, dest: str) -> None:
    spec = f.metadata["arg"]
    help = spec["help"] and spec["help"].replace("%", "%%")  # argparse formats help with %
    name = f.name.replace("_", "-")
    if isinstance(default, bool):  # a switch away from the default
        p.add_argument(spec["flag"] or (f"--no-{name}" if default else f"--{name}"), dest=dest,
                       action="store_false" if default else "store_true", help=help)
        return
    flag = spec["flag"] or f"--{name}"
    given = dict(required=True) if default is MISSING else dict(default=default)
    p.add_argument(flag, dest=dest, type=spec["check"], metavar=flag[2:].replace("-", "_").upper(), help=help,
                   **given)


def config_from(config, args, **given):
    """The ``config`` dataclass of the parsed ``args``: each field from the option of its name (a
    nested one's from ``<field>_<name>``), ``given`` over them; a field without an option keeps its default."""
    parsed, values = vars(args), {}
    for f in fields(config):
        if f.name in given:
            continue
        default = _field_default(f)
        if is_dataclass(default):
            values[f.name] = replace(default, **{g.name: parsed[f"{f.name}_{g.name}"] for g in fields(default)
                                                 if f"{f.name}_{g.name}" in parsed})
        elif f.name in parsed:
            values[f.name] = parsed[f.name]
    return config(**values, **given)


def check_fields(config) -> None:
    """Check every :func:`arg` field of the dataclass ``config`` (and of the dataclasses it holds)
    that has a value as the command line would: Python callers get the same one-line errors."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value)
            continue
        check = f.metadata.get("arg", {}).get("check")
        if check is None or value is None or isinstance(value, bool):
            continue
        try:
            check(str(value))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{f.name} {e}") from None
