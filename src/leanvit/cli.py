"""The ``leanvit`` command line: the parser of every command, and ``main``, its one error boundary.

Each option that several commands take is defined once below (``_add_<option>``), with what
differs between the commands (a default, a help line) as arguments. What a command does is in
:mod:`leanvit.commands`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from pathlib import Path

from .commands import (  # noqa: F401 (the parser looks the commands up here: a test may replace one)
    check_outputs, cmd_bench, cmd_compare, cmd_demo, cmd_eval, cmd_export, cmd_match, cmd_methods, cmd_models,
    cmd_sweep, cmd_train, cmd_train_policy, cmd_train_selector, out_lock)
from .data import DATA_HELP
from .outputs import check_no_overwrite
from .options import add_config_args, config_from, parse_options, parse_spec  # noqa: F401 (leanvit.cli's API)
# the checks of option values (the trainings' configurations name theirs); the tests find them as cli.<check>
from .options import below_one, fraction, natural, nonnegative, path, positive, positive_int, unit  # noqa: F401

EPILOG = "Method options: --opt key=value (repeatable), e.g. --method ppt --opt r=50 --opt layers=3,6,9"
DEBUG_HELP = "show the Python traceback of an error (for reporting a bug)"


# --- the options several commands share --------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a timm model name, a leanvit reference model, "
                   "hf:<local dir or hub name> (transformers) or open_clip:<arch> (with --checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=path, help="local weights (.safetensors or torch file)")
    src.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs network)")
    p.add_argument("--num-classes", type=positive_int, help="classifier size (default: from the checkpoint or the model)")
    _add_threads(p, help="torch CPU threads (default: torch's choice)")


def _add_threads(p, help=None) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help=help)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --amp, for every command that runs a model (leanvit.device says what they do)."""
    from .device import AMP, AMP_HELP, DEVICE_HELP
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--amp", choices=list(AMP), default="off", help=AMP_HELP)


def _add_method(p) -> None:
    p.add_argument("--method", default="none", help="a method from `leanvit methods`")


def _add_opt(p, help="method option (repeatable)") -> None:
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_specs(p, help: str) -> None:
    p.add_argument("--methods", nargs="+", required=True, metavar="SPEC", help=help)


def _add_data(p, help=DATA_HELP, required=False) -> None:
    p.add_argument("--data", type=path, help=help, **(dict(required=True) if required else {}))


def _add_split(p, default: str, help=None) -> None:
    p.add_argument("--split", default=default, help=help)


def _add_limit(p, help: str, default=None) -> None:
    p.add_argument("--limit", type=positive_int, default=default, help=help)


def _add_batch_size(p, default: int) -> None:
    p.add_argument("--batch-size", type=positive_int, default=default)


def _add_workers(p, help=None) -> None:
    p.add_argument("--workers", type=natural, default=None, help=help)


def _add_json(p, help="write the result as JSON here") -> None:
    p.add_argument("--json", type=path, help=help)


def _add_out(p, default: str, help: str) -> None:
    p.add_argument("--out", type=path, default=default, help=help)


def _add_restart(p) -> None:
    p.add_argument("--restart", action="store_true", help="start over: ignore (and remove) OUT/last.pt")


def _add_training(p, config, opt_help="method option (repeatable)", **config_kw) -> None:
    """What every training command takes: the model, --opt, its configuration's fields, --restart, the device."""
    _add_model_args(p)
    _add_opt(p, help=opt_help)
    add_config_args(p, config, **config_kw)
    _add_restart(p)
    _add_device_args(p)


# --- the commands ------------------------------------------------------------------------------
def _eval_and_bench(command) -> None:
    p = command("eval", help="top-1, GMACs and images/s of the dense model and a method", epilog=EPILOG)
    _add_model_args(p)
    _add_data(p, required=True)
    _add_split(p, "val", help="split folder inside --data (default val; test also accepted)")
    _add_method(p)
    _add_opt(p)
    _add_batch_size(p, 64)
    _add_workers(p, help="data loading processes")
    _add_limit(p, "evaluate a seeded subset of this many images")
    _add_json(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_eval)

    p = command("bench", help="throughput of dense vs methods (median of repeats)")
    _add_model_args(p)
    _add_specs(p, "method specs name:key=value:..., e.g. tome:r=13 evit:keep_rate=0.7 ppt:r=50")
    _add_batch_size(p, 32)
    p.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"))
    _add_data(p, help="take the batch from this data set instead of noise")
    _add_split(p, "val")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="batch size 1: time --batch-size images, each its own forward")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--warmup", type=natural, default=1)
    p.add_argument("--profile-ops", type=positive_int, metavar="TOP",
                   help="then, where the time goes: the TOP operators of dense and each method per forward "
                        "(count, ms, calling line), the runners alternating")
    _add_json(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_bench)


def _trainings(command) -> None:
    from .train import TrainConfig
    from .train_policy import PolicyConfig
    from .train_prance import SUPERNET, SelectorConfig
    p = command("train", help="train or fine-tune a ViT (resumable; torchrun for data-parallel)",
                epilog="Re-running the same command resumes from OUT/last.pt. " + EPILOG)
    _add_training(p, TrainConfig, skip={"sandwich", "sandwich_widths", "reorder"})
    p.set_defaults(func=cmd_train)

    p = command("train-supernet", help="PRANCE's channel-elastic meta-network: weight-sharing fine-tuning",
                epilog="Heads and MLP neurons are reordered by importance first (--no-reorder to skip); "
                       "every step trains the largest sub-network on the labels, then the smallest and "
                       "random ones on its predictions. Re-running the same command resumes from OUT/last.pt.")
    _add_training(p, TrainConfig, skip={"method"})
    p.set_defaults(func=cmd_train, **SUPERNET)

    p = command("train-selector", help="PRANCE's selector: PPO with Result-to-Go (resumable; torchrun)",
                epilog="With --budget, the cost weight is a Lagrange multiplier moved toward the budget "
                       "after every batch by a PI controller on the greedy selector's GMACs ratio. "
                       "Load the selector with --method prance --opt weights=OUT/selector.safetensors.")
    _add_model_args(p)
    _add_opt(p, help="prance option: strategy=prune|merge|prune-merge|none, channels=true|false, stages=4")
    p.add_argument("--budget", type=fraction, nargs="+", help="target mean GMACs as a fraction of dense, e.g. 0.5; "
                   "several budgets train one selector each, in OUT/budget-B/")
    add_config_args(p, SelectorConfig)
    _add_restart(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_train_selector)

    p = command("train-policy", help="train RL4EViT's agents by multi-agent PPO (resumable; torchrun)",
                epilog="With --budget, alpha is moved toward the budget after every batch by a PI controller "
                       "on the greedy policy's GMACs ratio (never below 0), then the keep logit is calibrated "
                       "on the evaluation images. Re-running the same command resumes from OUT/last.pt.")
    _add_model_args(p)
    p.add_argument("--method", default="rl4evit")
    _add_opt(p, help="rl4evit option: placement=before|after, hidden=[64] (a cheap actor), agents=multi|single, "
                     "layers=[3,6,9], activation=tanh|relu")
    add_config_args(p, PolicyConfig)
    _add_restart(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_train_policy)


def _export_and_lists(command) -> None:
    p = command("export", help="the model with a fixed-count method as ONNX (dynamic batch axis)",
                epilog="Exports dense and the methods with fixed shapes (tome, evit, ppt, random with "
                       "fixed=true, channels, dynamicvit); per-image methods (ats, rl4evit, prance) are refused. "
                       "Needs pip install 'leanvit[export]'. " + EPILOG)
    _add_model_args(p)
    _add_method(p)
    _add_opt(p)
    p.add_argument("--out", dest="onnx", type=path, required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.set_defaults(func=cmd_export, device="cpu", amp="off")

    command("methods", help="list the token-reduction methods").set_defaults(func=cmd_methods)
    command("models", help="list leanvit's reference models").set_defaults(func=cmd_models)


def _sweep_and_compare(command) -> None:
    p = command("sweep", help="every method at several budgets: table, JSON, Pareto plot, token maps")
    _add_model_args(p)
    _add_data(p)
    _add_split(p, "test")
    _add_specs(p, "method specs name:key=value:..., e.g. tome:r=2 tome:r=4 ppt:r=10:threshold=scaled; "
                  "checkpoint=FILE runs one on other weights for --model (e.g. a ViT fine-tuned with "
                  "dynamicvit), model=NAME on another shipped model, both against --model's dense forward")
    _add_limit(p, "a class-balanced subset of this many images (default: all)")
    _add_batch_size(p, 250)
    _add_workers(p)
    _add_out(p, "leanvit-sweep", "output directory")
    p.add_argument("--random-floor", action="store_true",
                   help="also run, for every method, random tokens at its own per-image counts and widths on the "
                        "same images, and report the paired differences (KL, agreement, top-1) with 95%% intervals")
    p.add_argument("--shuffled-floor", action="store_true",
                   help="--random-floor, and also the shuffled floor: the per-image counts and widths of each batch "
                        "dealt to its images in a random order (the control for which image gets which budget; "
                        "for a method that changes only channel widths, the only one)")
    _add_device_args(p)
    p.set_defaults(func=cmd_sweep)

    p = command("compare", help="every curve of sweep results read at equal GMACs (a table, and a plot)")
    p.add_argument("results", nargs="+", type=path, help="results.json files of `leanvit sweep` (rows merged)")
    at = p.add_mutually_exclusive_group(required=True)
    at.add_argument("--gmacs", nargs="+", type=positive, help="GMACs per image to read every curve at")
    at.add_argument("--of-dense", nargs="+", type=fraction, help="... as fractions of the dense GMACs")
    p.add_argument("--metric", default="top1", choices=("top1", "agreement", "kl_to_dense"))
    p.add_argument("--plot", type=path, help="also write a Pareto plot (PNG) of the curves")
    p.add_argument("--curves", nargs="+", help="plot only curves whose name starts with one of these")
    p.add_argument("--title")
    p.set_defaults(func=cmd_compare)


def _match(command) -> None:
    p = command("match", help="settings of fixed-count methods at a method's (or a given) GMACs, "
                "and random tokens at its counts", epilog="With --method, its mean GMACs and tokens per block "
                "over --data; the random:schedule spec keeps random tokens at those counts, the control for "
                "any per-image choice of tokens.")
    _add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--method", metavar="SPEC", help="a method spec, e.g. rl4evit:weights=cifar10_vit12_w128")
    what.add_argument("--gmacs", type=positive, help="a target in GMACs per image")
    what.add_argument("--of-dense", type=fraction, help="a target as a fraction of the dense GMACs")
    p.add_argument("--methods", nargs="+", default=["tome", "evit", "ppt", "dynamicvit"],
                   help="the fixed-count methods to match (default: tome evit ppt dynamicvit)")
    _add_data(p, help=DATA_HELP + " (needed with --method)")
    _add_split(p, "test")
    _add_limit(p, "class-balanced subset (default 2000)", default=2000)
    _add_batch_size(p, 250)
    _add_workers(p)
    _add_json(p, help="write the target, the matched settings (and counts) as JSON here")
    _add_device_args(p)
    p.set_defaults(func=cmd_match)


def _demo(command) -> None:
    p = command("demo", help="the shipped reference model against every parameter-free method")
    p.add_argument("--testbed", choices=("cifar10", "cluttered"),
                   help="cifar10: CIFAR-10's test images as they are (the default, unless --data names a cluttered "
                        "set); cluttered: each object at a random "
                        "place and scale on a 64x64 textured canvas, with its box: adds which tokens each method "
                        "keeps (object recall, background kept, adaptivity, the oracle floor)")
    _add_data(p, help="CIFAR-10 (default: $LEANVIT_DATA, ./data, ../shared/data or ~/.cache/leanvit; "
                      "without any, the 2,000 test images shipped with leanvit)")
    p.add_argument("--download", action="store_true",
                   help="download the full CIFAR-10 through torchvision into ~/.cache/leanvit (once)")
    _add_split(p, "test")
    _add_limit(p, "class-balanced subset of the test set (default 2000: the shipped sample, about 3 minutes "
                  "on 2 cores)", default=2000)
    p.add_argument("--full", action="store_true", help="all 10,000 test images (needs the full set)")
    _add_batch_size(p, 250)
    _add_workers(p)
    _add_threads(p)
    _add_out(p, "leanvit-demo", "output directory (default ./leanvit-demo)")
    _add_device_args(p)
    p.set_defaults(func=cmd_demo)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (the problem, then where the options are listed)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="leanvit", description="Cheaper Vision Transformers per image.", epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # also after the command (leanvit eval ... --debug); SUPPRESS keeps a leading --debug
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, **kw):
        p = sub.add_parser(name, parents=[common], **kw)
        p.add_argument("--force", action="store_true", help="replace an existing output file that is not a "
                       "leanvit result (never a file the command reads)")
        return p

    for add in (_eval_and_bench, _trainings, _export_and_lists, _sweep_and_compare, _match, _demo):
        add(command)
    return parser


def main(argv=None) -> int:
    """The one error boundary: an expected failure (bad option, missing or corrupt file, data
    problem, unwritable output) is one line on stderr and exit code 2; a traceback only with
    --debug, or for an exception no check anticipated (a bug)."""
    from safetensors import SafetensorError
    from .runtime import UnsupportedModelError
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error argparse has printed (2)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    try:
        check_outputs(args)
        check_no_overwrite(args)
        with out_lock(Path(args.out)) if getattr(args, "out", None) else contextlib.nullcontext():
            return args.func(args)
    except (ValueError, OSError, SafetensorError, UnsupportedModelError) as e:
        # DataError, OptionError, ModelError, CheckpointError and CliError are ValueErrors
        if args.debug:
            traceback.print_exc()
        hint = " (check the path, its permissions and the free disk space)" if isinstance(e, OSError) else ""
        print(f"leanvit: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanvit: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
