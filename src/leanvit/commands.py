"""What each ``leanvit`` command does, once its options are parsed (``leanvit.cli`` parses them),
and the checks of where a command writes: made before any work, and a lock on its output directory.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from .options import config_from, parse_options, parse_spec


class CliError(ValueError):
    """A usage problem the command line finds itself (an output path, a busy run directory)."""


def _device(args) -> torch.device:
    """The command's device, present and able to run its --amp (else a one-line DeviceError)."""
    from .device import check_amp, select_device
    device = select_device(args.device)
    check_amp(device, args.amp)
    return device


def _load(args):
    from .models import create_model
    device = _device(args)  # before the weights load: a missing device fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # models without weights (tests, speed) get the same random weights every run
    return create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                        num_classes=args.num_classes).to(device)


def cmd_eval(args) -> int:
    """Under torchrun every process evaluates its shard of the images; the results are summed
    over the processes, and process 0 prints and writes them."""
    from .data import eval_transform, load_dataset, make_loader, model_label_names, resolve_data
    from .device import init_distributed, module_device, pin_memory
    from .evaluate import evaluate
    from .provenance import method_weights, provenance
    from .report import format_sweep_table
    from .runtime import adapt
    options = parse_options(args.opt)
    model = _load(args)
    device = module_device(model)
    rank, world = init_distributed(device)
    method = adapt(model, args.method, **options)
    dataset = load_dataset(args.data, split=args.split, transform=eval_transform(model),
                           num_classes=model.num_classes, limit=args.limit, classes=model_label_names(model))
    loader = make_loader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                         pin_memory=pin_memory(device), shard=(rank, world))
    runners = {"dense": adapt(model, "none")}
    if args.method != "none":
        runners[args.method] = method
    results = evaluate(runners, loader, desc=f"eval {args.model}", amp=args.amp)
    objects = None  # every process measures its shard
    if getattr(dataset, "has_boxes", False) and args.method != "none":
        from .objects import object_report
        objects = object_report(runners, loader)[args.method]
    if rank != 0:
        return 0
    dense = results["dense"]
    folders = f", {len(dataset.skipped_folders)} folders skipped" if dataset.skipped_folders else ""
    folders += f", {len(dataset.skipped_files)} non-image entries skipped" if dataset.skipped_files else ""
    print(f"model {args.model}  data {dataset.root} ({args.split}, {dense.n_images} images, "
          f"{dense.skipped} unreadable skipped{folders})  threads {torch.get_num_threads()}  batch {args.batch_size}")
    rows = [dict(r.to_dict(), label=" ".join(args.opt)) for name, r in results.items() if name != "dense"]
    print(format_sweep_table(rows, dense), end="")
    for r in results.values():
        if "prune_fraction_per_layer" in r.extra:
            mix = ", ".join(f"L{l}: {100 * f:.0f}% prune" for l, f in r.extra["prune_fraction_per_layer"].items())
            print(f"{r.method} policy mix: {mix}")
    if objects is not None:
        from .objects import format_object_table
        print(format_object_table([dict(rows[0], objects=objects)]))
    main_result = results[args.method if args.method != "none" else "dense"]
    if args.json:
        payload = dict(main_result.to_dict(), model=args.model, data=str(dataset.root), split=args.split,
                       options=options, batch_size=args.batch_size, threads=torch.get_num_threads(),
                       processes=world, device=str(device), amp=args.amp, skipped_folders=dataset.skipped_folders,
                       skipped_files=dataset.skipped_files,
                       dense=dense.to_dict(), method_weights=method_weights(args.method, options), objects=objects,
                       provenance=provenance(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                             data=resolve_data(args.data), split=args.split, limit=args.limit))
        _write_json(args.json, payload)
    return 0


def _on_model(text: str):
    """A method spec that runs on --model (model=/checkpoint= of a spec are for sweep)."""
    spec = parse_spec(text)
    if spec.model or spec.checkpoint:
        raise CliError(f"{text}: model= and checkpoint= in a method spec are for `leanvit sweep`; "
                       "here the method runs on --model (and --checkpoint)")
    return spec


def cmd_bench(args) -> int:
    from .bench import benchmark, format_speed_table
    from .data import resolve_data
    from .provenance import provenance
    from .runtime import adapt
    methods = [(text, spec.method, spec.options) for text, spec in zip(args.methods, map(_on_model, args.methods))]
    model = _load(args)
    size = args.input_size or list(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if args.data:
        from .data import eval_transform, load_dataset, make_loader
        ds = load_dataset(args.data, split=args.split, transform=eval_transform(model), limit=args.batch_size)
        images = next(iter(make_loader(ds, batch_size=args.batch_size, num_workers=0))).images
        if images.shape[0] < args.batch_size:
            raise ValueError(f"{args.data} has only {images.shape[0]} readable images; need --batch-size")
    else:
        images = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(0))
    result = benchmark(model, methods, images, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                       one_at_a_time=args.one_at_a_time, amp=args.amp)
    result["settings"].update(model=args.model, data=args.data or "gaussian noise")
    result["provenance"] = provenance(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                      data=resolve_data(args.data) if args.data else None, split=args.split)
    print(format_speed_table(result))
    if args.profile_ops:
        from .bench import format_profile, profile_operators
        runners = {"dense": adapt(model, "none"), **{label: adapt(model, name, **opts) for label, name, opts in methods}}
        result["operators"] = profile_operators(runners, images, repeats=args.repeats, top=args.profile_ops)
        print(format_profile(result["operators"]))
    if args.json:
        _write_json(args.json, result)
    return 0


def _start_run(args) -> None:
    """Threads; with --restart, forget the run's resume checkpoints (one per budget for train-selector).
    Rank 0 removes them before the process group forms, so no process can have read them yet."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.restart and int(os.environ.get("RANK", "0")) == 0:
        for ckpt in [Path(args.out) / "last.pt", *Path(args.out).glob("budget-*/last.pt")]:
            ckpt.unlink(missing_ok=True)


def _run_log(out: str):
    """A logger that prints a line and appends it to OUT/train.log."""
    path = Path(out) / "train.log"

    def log(line: str) -> None:
        print(line, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return log


def cmd_train(args) -> int:
    from .train import TrainConfig, train
    cfg = config_from(TrainConfig, args, options=parse_options(args.opt))
    _start_run(args)
    log = _run_log(args.out)
    metrics = train(cfg, log=log)
    if int(os.environ.get("RANK", "0")) == 0:
        subnets = "".join(f", {k[5:]} sub-network {v:.2f}%" for k, v in metrics.items() if k.startswith("top1_"))
        log(f"done: top-1 {metrics['top1']:.2f}%{subnets} after {metrics['steps']} steps; "
            f"weights in {Path(args.out) / 'final.safetensors'}")
    return 0


def cmd_train_selector(args) -> int:
    from .train_prance import SelectorConfig, train_selector
    cfg = config_from(SelectorConfig, args, options=parse_options(args.opt), budget=None)
    _start_run(args)
    log = _run_log(args.out)
    main = int(os.environ.get("RANK", "0")) == 0
    for budget in args.budget or [None]:
        out = Path(args.out) / f"budget-{budget:g}" if budget and len(args.budget) > 1 else Path(args.out)
        m = train_selector(replace(cfg, out=str(out), budget=budget), log=log)
        if main:
            met = "" if budget is None else f"budget {budget} {'met' if m['budget_met'] else 'NOT met'}: "
            log(f"done: {met}top-1 {m['top1']:.2f}% at {m['gmacs']:.4f} GMACs ({m['gmacs_ratio']:.3f} of dense), "
                f"final cost weight {m['cost_weight']:.4g}; selector in {out / 'selector.safetensors'}")
    return 0


def cmd_train_policy(args) -> int:
    from .train_policy import PolicyConfig, train_policy
    if args.method != "rl4evit":
        raise ValueError(f"train-policy trains rl4evit; got --method {args.method}")
    cfg = config_from(PolicyConfig, args, options=parse_options(args.opt))
    _start_run(args)
    log = _run_log(args.out)
    metrics = train_policy(cfg, log=log)
    if int(os.environ.get("RANK", "0")) == 0 and metrics["history"]:
        last = metrics["history"][-1]
        met = "" if args.budget is None else f"budget {args.budget} {'met' if metrics['budget_met'] else 'NOT met'}: "
        log(f"done: {met}greedy top-1 {last['top1']:.2f}% at {last['gmacs']:.4f} GMACs ({last['gmacs_ratio']:.3f} of "
            f"dense; actor {last['decision_gmacs']:.4f}), alpha {last['alpha']:.4g}; "
            f"policy in {Path(args.out) / 'policy.safetensors'}")
    return 0


def cmd_export(args) -> int:
    """The model with its method as ONNX (dynamic batch axis), checked in onnxruntime against PyTorch."""
    from .export import export_onnx, run_onnx
    from .runtime import adapt
    out = Path(args.onnx)
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; pass a file name, e.g. {out / 'model.onnx'}")
    _check_writable(out.parent, "--out", out)
    model = _load(args).eval()
    runner = adapt(model, args.method, **parse_options(args.opt))
    export_onnx(runner, out)
    size = list(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((run_onnx(out, images) - runner(images)).abs().max())
    print(f"wrote {out} ({args.model}, {runner.method!r}; input images (batch, {', '.join(map(str, size))}), "
          f"output logits); onnxruntime vs PyTorch on 2 images: max |logit difference| {diff:.2e}")
    return 0


def cmd_methods(args) -> int:
    from .methods import list_methods
    from .methods.base import REGISTRY
    width = max(map(len, list_methods())) + 2
    for name in list_methods():
        doc = (REGISTRY[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:<{width}}{doc}")
    return 0


def cmd_models(args) -> int:
    from .models import list_models
    names = list_models()
    print("\n".join(names) if names else "no reference model shipped yet; any timm ViT name works with --model")
    return 0


def _comparison(args, model, model_name, specs, data_path) -> int:
    from .data import eval_transform, load_dataset, model_label_names, resolve_data
    from .demo import run_comparison
    from .provenance import provenance
    dataset = load_dataset(data_path, split=args.split, transform=eval_transform(model),
                           num_classes=model.num_classes, limit=args.limit, classes=model_label_names(model))
    source = provenance(model=model_name, checkpoint=getattr(args, "checkpoint", None),
                        pretrained=getattr(args, "pretrained", False), data=resolve_data(data_path), split=args.split,
                        limit=args.limit)
    result = run_comparison(model, model_name, dataset, specs, args.out, batch_size=args.batch_size,
                            workers=args.workers, provenance=source, amp=args.amp,
                            random_floor=getattr(args, "random_floor", False),
                            shuffled_floor=getattr(args, "shuffled_floor", False))
    if "table" not in result:  # not process 0 under torchrun: it prints and writes
        return 0
    print(f"{model_name} on {dataset.root} ({args.split}, {result['n_images']} images), "
          f"{result['threads']} threads, batch {args.batch_size}, {result['seconds']:.0f} s")
    print(result["table"])
    print(f"wrote {args.out}/results.json, pareto.png, token_maps.png, table.txt")
    return 0


def cmd_sweep(args) -> int:
    specs = [parse_spec(s) for s in args.methods]
    return _comparison(args, _load(args), args.model, specs, args.data)


def cmd_compare(args) -> int:
    from .analysis import at_gmacs, format_at_gmacs, load_sweep_results
    results = [load_sweep_results(path) for path in args.results]
    dense = results[0]["dense"]
    gmacs = args.gmacs or [f * dense["gmacs"] for f in args.of_dense]
    print(format_at_gmacs(at_gmacs(results, gmacs, metric=args.metric), gmacs, dense, metric=args.metric))
    if args.plot:
        from .analysis import curve_key
        from .report import pareto_plot
        points = [dict(method=curve_key(row), gmacs=row["gmacs"], top1=row["top1"], label=row.get("label", ""))
                  for r in results for row in r["rows"]
                  if not args.curves or any(curve_key(row).startswith(c) for c in args.curves)]
        pareto_plot(points, args.plot, title=args.title, dense=dense)
        print(f"wrote {args.plot}")
    return 0


def cmd_match(args) -> int:
    from .analysis import match_gmacs, mean_tokens, random_control
    from .measure import count_macs
    from .runtime import adapt
    from .device import autocast, module_device
    model = _load(args)
    device = module_device(model)
    size = list(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    probe = torch.zeros(1, *size, device=device)
    dense = count_macs(model, probe)
    result = dict(model=args.model, dense_gmacs=dense)
    if args.method:
        if not args.data:
            raise CliError("--method needs --data: a method's token counts depend on the images")
        from .data import eval_transform, load_dataset, make_loader, model_label_names
        spec = _on_model(args.method)
        runner = adapt(model, spec.method, **spec.options)
        ds = load_dataset(args.data, split=args.split, transform=eval_transform(model), num_classes=model.num_classes,
                          limit=args.limit, classes=model_label_names(model))
        loader = make_loader(ds, batch_size=args.batch_size, num_workers=args.workers)
        with autocast(device, args.amp):
            counts, target, n = mean_tokens(runner, (b.images.to(device) for b in loader))
        print(f"{args.method}: {target:.4f} GMACs/image ({target / dense:.3f} of dense {dense:.4f}) on {n} images "
              f"of {args.data} ({args.split})")
        print("mean tokens per block: " + " ".join(f"{c:.1f}" for c in counts))
        control = random_control(counts, runner.n_prefix)
        print(f"random at these counts: {control}")
        result.update(method=args.method, data=str(args.data), split=args.split, n_images=n, mean_tokens=counts,
                      random_control=control)
    else:
        target = args.gmacs if args.gmacs is not None else args.of_dense * dense
        print(f"target: {target:.4f} GMACs/image ({target / dense:.3f} of dense {dense:.4f})")
    matched = match_gmacs(model, target, probe, args.methods)
    for m, (text, g) in matched.items():
        print(f"{m:<11} {text:<45} {g:.4f} GMACs ({g / dense:.3f} of dense, {100 * (g / target - 1):+.1f}%)")
    if args.json:
        result.update(gmacs=target, matched={m: dict(spec=text, gmacs=g) for m, (text, g) in matched.items()})
        _write_json(args.json, result)
    return 0


def cmd_demo(args) -> int:
    from .data import EMBEDDED_CIFAR10, DataError, describe_search, download_cifar10, find_default_cifar10, resolve_data
    from .demo import TESTBEDS, demo_specs
    from .models import list_models, load_model
    device = _device(args)  # a missing device fails before anything else
    if args.threads:
        torch.set_num_threads(args.threads)
    from .data.cluttered import is_cluttered_spec
    testbed = args.testbed or ("cluttered" if is_cluttered_spec(args.data) else "cifar10")
    if testbed == "cifar10" and is_cluttered_spec(args.data):
        raise DataError(f"--data {args.data} is cluttered CIFAR-10, which the CIFAR-10 model was not trained on: "
                        "use --testbed cluttered")
    model_name = TESTBEDS[testbed]
    if model_name not in list_models():
        print(f"leanvit demo: the reference model {model_name} is not shipped in this checkout yet.\n"
              "Meanwhile try: leanvit eval --model deit_tiny_patch16_224 --data DIR --method ppt --opt r=50",
              file=sys.stderr)
        return 1
    if args.download and args.data:
        raise DataError("give either --download or --data, not both")
    data = download_cifar10() if args.download else args.data or find_default_cifar10()
    if data is None:
        if args.full:
            raise DataError("--full needs the full CIFAR-10 test set and found none; looked in:\n"
                            + describe_search() + "\npass --data PATH to a local copy, or --download")
        print("leanvit demo: no full CIFAR-10 found (--data PATH, $LEANVIT_DATA, ./data, ~/.cache/leanvit or "
              "--download); using the 2,000 CIFAR-10 test images shipped with leanvit")
        data = EMBEDDED_CIFAR10
    if args.full:
        if resolve_data(data) == EMBEDDED_CIFAR10:
            raise DataError("--full needs the full CIFAR-10 test set; the shipped sample has 2,000 of its images: "
                            "pass --data PATH to a local copy, or --download")
        args.limit = None
    if testbed == "cluttered" and not is_cluttered_spec(data):
        data = f"cluttered:{data}"
    return _comparison(args, load_model(model_name).to(device), model_name, demo_specs(model_name), data)


def _write_json(path: str, payload: dict) -> None:
    from .provenance import write_json
    write_json(path, payload)
    print(f"wrote {path}")



def _check_writable(folder: Path, option: str, path) -> None:
    """``folder`` (made if missing) can hold what ``option`` writes: checked by writing a probe
    file into the nearest folder that exists, so read-only mounts and permissions both show."""
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{option} {path}: {folder} is a file, not a directory; pass another path")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{option} {path}: {existing} is a file, not a directory; pass another path")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise CliError(f"{option} {path} cannot be written ({existing}: {e.strerror or e}); pass a path you "
                       "can write to") from None


def check_outputs(args) -> None:
    """Where the command will write, checked before any work: a bad path fails now, not after
    the evaluation or training it would have held."""
    if getattr(args, "json", None):
        path = Path(args.json)
        if path.is_dir():
            raise CliError(f"--json {path} is a directory; pass a file name, e.g. {path / 'result.json'}")
        _check_writable(path.parent, "--json", path)
    if getattr(args, "out", None):
        _check_writable(Path(args.out), "--out", args.out)


@contextlib.contextmanager
def out_lock(out: Path):
    """Hold ``OUT/.lock`` (flock) while a command writes into ``out``: a second run into the same
    directory stops at once, before it touches the first one's checkpoints or results. The lock
    goes with the process, however it ends. Under torchrun, rank 0 holds it for all processes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not lock.exists() or os.fstat(f.fileno()).st_ino != lock.stat().st_ino:
                raise BlockingIOError  # the run we waited on removed this lock file: someone else's turn
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise CliError(f"another leanvit run{f' (pid {holder})' if holder else ''} is writing into {out} "
                           f"(it holds {lock}); wait for it to finish, or pass another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            if created and os.listdir(out) == [lock.name]:  # a run that wrote nothing leaves nothing
                lock.unlink()
                out.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


