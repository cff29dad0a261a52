"""Deployment speed: eager PyTorch, torch.compile and onnxruntime for dense and every exportable
method on DeiT-S 224 (random weights: speed does not depend on them), on the CPU.

For each batch size and method: throughput in each backend (median of --repeats timings of about
--seconds each; every repeat times every method in every backend once, in a new random order, so
that drift of the machine's speed hits all alike), the ratio to dense in the same backend and run,
the compile time (a fresh inductor cache; the first call at each batch size), GMACs per image (leanvit.measure) and the efficiency
speedup / (dense GMACs / method GMACs): 1.0 means the method is as much faster as it is cheaper.

    flock /work/main/.cpu.lock python benchmarks/deploy_speed.py --batch 32 1 --table

Writes benchmarks/results/deploy/deploy_speed.json (after every measurement, so a partial run
keeps what it measured) and, with --table, prints the markdown table of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="leanvit-inductor-"))  # cold compiles

import torch  # noqa: E402

METHODS = {  # label: (method, options)
    "dense": ("none", {}),
    "tome r=13": ("tome", dict(r=13)),
    "evit keep_rate=0.7": ("evit", dict(keep_rate=0.7)),
    "ppt r=50": ("ppt", dict(r=50)),
    "random fixed keep_rate=0.7": ("random", dict(keep_rate=0.7, fixed=True)),
    "channels heads=0.5 mlp=0.5": ("channels", dict(heads=0.5, mlp=0.5)),
}
OUT = Path(__file__).parent / "results" / "deploy" / "deploy_speed.json"


def timed(fn, images, forwards: int) -> float:
    """Seconds for ``forwards`` calls."""
    t0 = time.perf_counter()
    for _ in range(forwards):
        fn(images)
    return time.perf_counter() - t0


def table(result: dict) -> str:
    lines = ["| batch | method | GMACs | GMACs ratio | eager img/s | × dense | compiled img/s | × dense | "
             "compile s | onnxruntime img/s | × dense | efficiency eager / compiled / onnx |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
        eff = " / ".join(f(row["efficiency"].get(b), 2) for b in ("eager", "compiled", "onnx"))
        lines.append(f"| {row['batch']} | {row['method']} | {row['gmacs']:.2f} | {row['gmacs_ratio']:.2f} | "
                     f"{f(row['eager'])} | {f(row['speedup'].get('eager'), 2)} | {f(row.get('compiled'))} | "
                     f"{f(row['speedup'].get('compiled'), 2)} | {f(row.get('compile_seconds'), 0)} | "
                     f"{f(row.get('onnx'))} | {f(row['speedup'].get('onnx'), 2)} | {eff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="about this long per timing (sets the forwards)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table", action="store_true", help="print the markdown table")
    p.add_argument("--from-json", type=Path, help="only print the table of this result file (no measurement)")
    args = p.parse_args(argv)
    if args.from_json:
        print(table(json.loads(args.from_json.read_text())))
        return 0

    import timm
    from leanvit import adapt
    from leanvit.export import export_onnx, onnx_session
    from leanvit.measure import count_macs

    torch.set_num_threads(args.threads)
    # every runner's forward is the same code object (LeanViT.forward), so each method and batch size is
    # one more entry in its dynamo cache: more than the default limit of 8 in one process
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    runners = {label: adapt(model, name, **opts) for label, (name, opts) in METHODS.items() if label in args.methods}
    if "dense" not in runners:
        runners = {"dense": adapt(model, "none"), **runners}
    result = dict(settings=dict(model=args.model, threads=args.threads, repeats=args.repeats, batches=args.batch,
                                input_size=list(size), torch=torch.__version__, python=platform.python_version(),
                                machine=f"{platform.machine()} {os.cpu_count()}-core CPU VM",
                                date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                                command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))),
                  rows=[])
    import onnx
    import onnxruntime
    result["settings"]["onnxruntime"] = onnxruntime.__version__
    probe = torch.randn(8, *size, generator=torch.Generator().manual_seed(0))
    gmacs = {label: count_macs(r, probe) for label, r in runners.items()}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        sessions, ops, export_seconds = {}, {}, {}
        for label, runner in runners.items():
            t0 = time.perf_counter()
            path = export_onnx(runner, Path(tmp) / f"{label.split()[0]}.onnx")
            export_seconds[label] = time.perf_counter() - t0
            sessions[label] = onnx_session(path, threads=args.threads)
            # what the graph is made of (gathers, scatters, ...)
            ops[label] = dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node).most_common())
            print(f"exported {label} in {export_seconds[label]:.0f} s", flush=True)
        compiled = {} if args.no_compile else {label: torch.compile(r, fullgraph=True) for label, r in runners.items()}
        for b in args.batch:
            images = torch.randn(b, *size, generator=torch.Generator().manual_seed(1))
            feed = images.numpy()
            calls, rows = {}, {}
            for label, runner in runners.items():
                rows[label] = dict(batch=b, method=label, gmacs=gmacs[label], gmacs_ratio=gmacs["dense"] / gmacs[label],
                                   export_seconds=export_seconds[label], onnx_ops=ops[label])
                calls[label, "eager"] = runner
                calls[label, "onnx"] = lambda x, s=sessions[label]: s.run(["logits"], {"images": feed})
                if label in compiled:
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        compiled[label](images)  # the first call at this batch size compiles
                        rows[label]["compile_seconds"] = time.perf_counter() - t0
                    calls[label, "compiled"] = compiled[label]
            with torch.no_grad():
                for fn in calls.values():
                    fn(images)  # warm-up
                forwards = max(1, round(args.seconds / timed(calls["dense", "eager"], images, 1)))
                # every repeat times each (method, backend) once, in a new random order: drift of the
                # machine's speed hits all of them alike instead of whichever ran last
                rates = {key: [] for key in calls}
                order = list(calls)
                rng = random.Random(b)
                for _ in range(args.repeats):
                    rng.shuffle(order)
                    for key in order:
                        rates[key].append(forwards * b / timed(calls[key], images, forwards))
            for (label, backend), r in rates.items():
                rows[label][backend] = statistics.median(r)
                rows[label][f"{backend}_spread"] = [min(r), max(r)]
            for label, row in rows.items():
                row["forwards"] = forwards
                row["speedup"] = {k: row[k] / rows["dense"][k] for k in ("eager", "compiled", "onnx") if k in row}
                row["efficiency"] = {k: v / row["gmacs_ratio"] for k, v in row["speedup"].items()}
                result["rows"].append(row)
                print(f"batch {b} {label}: eager {row['eager']:.1f}, compiled {row.get('compiled', 0):.1f} "
                      f"(compile {row.get('compile_seconds', 0):.0f} s), onnx {row['onnx']:.1f} img/s; "
                      f"speedups {row['speedup']}, GMACs ratio {row['gmacs_ratio']:.2f}", flush=True)
            save()
    if args.table:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
