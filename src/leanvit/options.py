"""The one parser of the option and method-spec syntax the command line and the comparisons share.

    key=value                  one option: parse_options(["r=50", "layers=3,6,9"])
    name:key=value:key=value   a method with its options: parse_spec("ppt:r=10:threshold=scaled")

Also how a configuration field is given on the command line: :func:`arg` marks a dataclass
field with the check of its value (:data:`positive_int`, :func:`path`, ...) and its help, and
``leanvit.cli`` makes one option of each such field, with the field's default.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
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
