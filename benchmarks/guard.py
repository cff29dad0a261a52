"""Speed regression guard: the working tree against a base commit, case by case.

    python benchmarks/guard.py                       # against main (on main: HEAD, or HEAD~1 if clean)
    python benchmarks/guard.py --base 89b31df --cases deit-s/b32/tome --rounds 10
    python benchmarks/guard.py --list                # the cases

The base commit's ``src/`` is extracted (``git archive``) into a temporary directory, removed at exit
(also on Ctrl-C or SIGTERM). Every round runs, for each model and batch size, one child process per
side, each importing leanvit from its own ``src/`` (base first in even rounds, the working tree first in
odd ones): the same runners on the same images, with the same threads: seeded random images for
DeiT-S; for the reference models, CIFAR-10 images from the sample shipped with leanvit, written once
by the working tree to a file both sides read (on noise the shipped RL4EViT policy keeps every token,
and there would be nothing to measure). A child builds the model with fixed random weights (DeiT-S)
or loads a shipped reference model, warms up, times ``--repeats`` timings of ``forwards`` forwards
each (its runners in a shuffled order each repeat) and prints one JSON line with the median seconds
per forward of every runner.

Per case the table gives the medians over rounds of both sides, the median of the per-round ratios
base / working tree (above 1: the working tree is faster), their range and interquartile range, and a
verdict with ``--tolerance``; ``vs ref`` is the working tree's time over a reference runner of the
same process (timm's own forward for ``none``; the random floor for a per-image method). Raw per-round
numbers, machine and commits go to ``benchmarks/results/guard/`` (see docs/speed-guard.md). Exit status
1 if a case is slower in the working tree, or fails there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
WORK_SRC = REPO / "src"
ZOO = WORK_SRC / "leanvit" / "zoo"
RESULTS = REPO / "benchmarks" / "results" / "guard"
DEIT_S = "deit_small_patch16_224"
REFERENCE, PRANCE_MODEL = "cifar10_vit12_w128", "cifar10_vit12_w128_prance"


@dataclass(frozen=True)
class Runner:
    """What one child times: timm's own forward (method None), a leanvit method, or a method's random
    floor (``floor_of``: the label of the method it replays). ``shipped``: the method's weights shipped
    in the working tree's zoo for this model (both sides load that same file)."""
    method: Optional[str] = None
    options: dict = field(default_factory=dict)
    floor_of: Optional[str] = None
    shipped: Optional[str] = None
    reference: Optional[str] = None  # label of the runner its ``vs ref`` column compares with


@dataclass(frozen=True)
class Group:
    """One child process per side and round: a model, a batch size, and the runners timed in it."""
    model: str
    batch: int
    forwards: int  # per timing: enough that a timing is not a few milliseconds
    runners: Dict[str, Runner]
    real_images: bool = False  # CIFAR-10 images of the shipped sample, else seeded random ones


TIMM, NONE = Runner(), Runner("none", reference="timm")
GROUPS: Dict[str, Group] = {
    "deit-s/b1": Group(DEIT_S, 1, 8, dict(timm=TIMM, none=NONE)),
    "deit-s/b32": Group(DEIT_S, 32, 1, dict(
        timm=TIMM, none=NONE, tome=Runner("tome", dict(r=13), reference="none"),
        evit=Runner("evit", dict(keep_rate=0.7), reference="none"), ppt=Runner("ppt", dict(r=50), reference="none"),
        ats=Runner("ats", dict(tokens=0.5), reference="none"))),
    "ref/b1": Group(REFERENCE, 1, 32, dict(timm=TIMM, none=NONE), real_images=True),
    "ref/b32": Group(REFERENCE, 32, 4, dict(
        timm=TIMM, none=NONE,
        rl4evit=Runner("rl4evit", shipped=REFERENCE, reference="rl4evit-floor"),
        **{"rl4evit-floor": Runner(floor_of="rl4evit")},
        ats=Runner("ats", reference="ats-floor"), **{"ats-floor": Runner(floor_of="ats")}), real_images=True),
    "prance/b32": Group(PRANCE_MODEL, 32, 4, dict(
        none=Runner("none"), prance=Runner("prance", shipped=PRANCE_MODEL, reference="prance-floor"),
        **{"prance-floor": Runner(floor_of="prance")}), real_images=True),
}
CASES = {f"{g}/{label}": (g, label) for g, group in GROUPS.items() for label in group.runners}


# ---------------------------------------------------------------- child: runs inside one side's src/

def _child_model(name: str):
    import timm
    import torch
    import leanvit
    if name == DEIT_S:
        torch.manual_seed(0)  # fixed random weights: speed does not depend on them
        return timm.create_model(name, pretrained=False).eval()
    return leanvit.load_model(name).eval()


def _child_runners(model, spec: dict, images):
    """label -> runner, or label -> the one-line error that kept it from being built."""
    import leanvit
    runners, errors = {}, {}
    for label, r in spec["runners"].items():
        try:
            if r["floor_of"] and r["floor_of"] not in runners:
                raise RuntimeError(f"no floor: {r['floor_of']} is unavailable here")
            if r["floor_of"]:
                from leanvit.bench import floor_of  # absent in old trees: the case is unavailable there
                runners[label] = floor_of(runners[r["floor_of"]], images)
            elif r["method"] is None:
                runners[label] = model
            else:
                runners[label] = leanvit.adapt(model, r["method"], **r["options"])
        except Exception as e:  # noqa: BLE001  (an old base may lack a method, option or function)
            errors[label] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return runners, errors


def _child_gmacs(runners: dict, images) -> dict:
    """GMACs per image of every leanvit runner (the two sides must have run the same work); None
    where this side cannot count them."""
    import leanvit
    out = {}
    for label, r in runners.items():
        if isinstance(r, leanvit.LeanViT):
            try:
                out[label] = leanvit.count_macs(r, images)
            except Exception:  # noqa: BLE001  (an old base's counter: the timing still stands)
                out[label] = None
    return out


def child_main(spec: dict) -> dict:
    """Time every runner of ``spec`` (one group) and return seconds per forward, per repeat."""
    import random
    import torch
    import leanvit
    torch.set_num_threads(spec["threads"])
    model = _child_model(spec["model"])
    size = tuple(model.pretrained_cfg["input_size"])
    if spec["images"]:
        from safetensors.torch import load_file
        images = load_file(spec["images"])["images"]
    else:
        images = torch.randn(spec["batch"], *size, generator=torch.Generator().manual_seed(spec["seed"]))
    with torch.inference_mode():
        runners, errors = _child_runners(model, spec, images)
        gmacs = _child_gmacs({k: v for k, v in runners.items() if not spec["runners"][k]["floor_of"]}, images)
        seconds: Dict[str, List[float]] = {k: [] for k in runners}
        order = list(runners)
        shuffle = random.Random(spec["seed"]).shuffle
        for i in range(spec["warmup"] + spec["repeats"]):
            shuffle(order)
            for label in order:
                t0 = time.perf_counter()
                for _ in range(spec["forwards"]):
                    runners[label](images)
                if i >= spec["warmup"]:
                    seconds[label].append((time.perf_counter() - t0) / spec["forwards"])
    return dict(leanvit=leanvit.__file__, torch=torch.__version__, threads=torch.get_num_threads(),
                input_size=list(size), images_checksum=float(images.double().abs().sum()), seconds=seconds,
                gmacs=gmacs, errors=errors,
                median={k: statistics.median(v) for k, v in seconds.items()})


def write_images(spec: dict) -> dict:
    """(Working tree only) ``batch`` CIFAR-10 images of leanvit's shipped sample, evenly spaced over
    it (its classes are in order), preprocessed for ``model``, to the safetensors file ``out``."""
    import torch
    import leanvit
    from safetensors.torch import save_file
    from leanvit.data import EMBEDDED_CIFAR10, eval_transform, load_dataset
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(leanvit.load_model(spec["model"])))
    step = len(ds) // spec["batch"]
    save_file({"images": torch.stack([ds[i * step][0] for i in range(spec["batch"])]).contiguous()}, spec["out"])
    return dict(images=f"{EMBEDDED_CIFAR10.name}: images 0, {step}, ..., {(spec['batch'] - 1) * step}")


# ---------------------------------------------------------------- parent: sides, rounds, statistics

def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def default_base() -> str:
    """main; on main itself (or without a main branch), HEAD if src/ has uncommitted changes, else HEAD~1."""
    main = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q", "main^{commit}"],
                          capture_output=True, text=True).stdout.strip()
    if main and main != git("rev-parse", "HEAD"):
        return "main"
    return "HEAD" if git("status", "--porcelain", "--", "src") else "HEAD~1"


def resolve(commit: str) -> str:
    try:
        return git("rev-parse", "--verify", f"{commit}^{{commit}}")
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SystemExit(f"guard: --base {commit}: not a commit of the repository at {REPO}") from None


def materialise(commit: str, dest: Path) -> Path:
    """The ``src/`` of ``commit`` extracted under ``dest``; returns that ``src``."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"],
                         check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(tar)
        f.seek(0)
        with tarfile.open(fileobj=f) as archive:
            if hasattr(tarfile, "data_filter"):  # Pythons with extraction filters: no path tricks
                archive.extractall(dest, filter="data")
            else:
                archive.extractall(dest)
    return dest / "src"


def child_spec(group: Group, labels: List[str], args, images: Optional[Path]) -> dict:
    runners = {}
    for label in labels:
        r = group.runners[label]
        options = dict(r.options)
        if r.shipped:  # the working tree's file, on both sides: the same policy decides
            options["weights"] = str(ZOO / f"{r.shipped}.{r.method}.safetensors")
        runners[label] = dict(method=r.method, options=options, floor_of=r.floor_of)
    return dict(model=group.model, batch=group.batch, forwards=args.forwards or group.forwards, runners=runners,
                threads=args.threads, images=str(images) if images else None,
                repeats=args.repeats, warmup=args.warmup, seed=args.seed)


def run_child(src: Path, spec: dict, mode: str = "--child") -> dict:
    """One child process importing leanvit from ``src``: its JSON result, or ``{"failed": reason}``."""
    threads = str(spec.get("threads", 1))
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(failed=f"exit {proc.returncode}: {tail[:300]}")
    out = json.loads(lines[-1])
    if "leanvit" in out and not Path(out["leanvit"]).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"child imported leanvit from {out['leanvit']}, not from {src}: check PYTHONPATH")
    return out


def needed_labels(group: Group, wanted: List[str]) -> List[str]:
    """``wanted`` with the methods the floors among them replay and the references they compare with."""
    labels = list(wanted)
    for label in wanted:
        r = group.runners[label]
        for extra in (r.floor_of, r.reference):
            if extra and extra not in labels:
                labels.append(extra)
    return [k for k in group.runners if k in labels]  # the group's order


def quartiles(values: List[float]):
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def verdict(ratios: List[float], tolerance: float) -> str:
    """From per-round ratios base / working tree: ``slower``/``faster`` when the median is beyond the
    tolerance and the interquartile range is on that side of 1; ``slower?``/``faster?`` when the median
    is but the rounds disagree (re-run with more rounds on a quiet machine); else ``same``."""
    m = statistics.median(ratios)
    q1, q3 = quartiles(ratios)
    if m < 1 - tolerance:
        return "slower" if q3 < 1 else "slower?"
    if m > 1 + tolerance:
        return "faster" if q1 > 1 else "faster?"
    return "same"


def _per_round(rounds: List[dict], group: str, side: str, label: str) -> List[Optional[float]]:
    return [r["groups"][group][side].get("median", {}).get(label) for r in rounds]


def _why_missing(rounds: List[dict], group: str, side: str, label: str) -> str:
    for r in rounds:
        out = r["groups"][group][side]
        if "failed" in out or label in out.get("errors", {}):
            return out.get("failed") or out["errors"][label]
    return "no timing"


def summarise(rounds: List[dict], group: str, label: str, reference: Optional[str], tolerance: float) -> dict:
    """One case's row: medians of both sides, ratio statistics, verdict, the working tree's time over
    its reference runner, and whether both sides ran the same GMACs."""
    base, work = (_per_round(rounds, group, s, label) for s in ("base", "work"))
    row = dict(case=f"{group}/{label}", base_ms=None, work_ms=None, ratio=None, vs_ref=None, reference=reference)
    if any(w is None for w in work):
        return dict(row, verdict="error", note="working tree: " + _why_missing(rounds, group, "work", label))
    row["work_ms"] = 1000 * statistics.median(work)
    if reference:
        ref = _per_round(rounds, group, "work", reference)
        if all(ref):
            row["vs_ref"] = statistics.median(w / f for w, f in zip(work, ref))
    if any(b is None for b in base):
        return dict(row, verdict="unavailable", note="base: " + _why_missing(rounds, group, "base", label))
    ratios = [b / w for b, w in zip(base, work)]
    q1, q3 = quartiles(ratios)
    row.update(base_ms=1000 * statistics.median(base), ratio=statistics.median(ratios), low=min(ratios),
               high=max(ratios), q1=q1, q3=q3, ratios=ratios, verdict=verdict(ratios, tolerance), note="")
    gmacs = [rounds[0]["groups"][group][s]["gmacs"].get(label) for s in ("base", "work")]
    if gmacs[0] is not None and gmacs[1] is not None and abs(gmacs[0] - gmacs[1]) > 1e-6 * max(gmacs):
        row["note"] = f"different work: {gmacs[0]:.4f} GMACs on base, {gmacs[1]:.4f} in the working tree"
    return row


def format_rows(rows: List[dict], batches: Dict[str, int]) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'case':<26}{'batch':>6}{'base ms':>10}{'work ms':>10}{'base/work':>11}{'range':>13}"
             f"{'IQR':>13}  {'verdict':<12}{'vs ref':>18}"]
    for r in rows:
        spread = (f"{r['low']:.2f}-{r['high']:.2f}", f"{r['q1']:.2f}-{r['q3']:.2f}") if r["ratio"] else ("-", "-")
        ref = f"{r['vs_ref']:.3f}x {r['reference']}" if r["vs_ref"] else "-"
        lines.append(f"{r['case']:<26}{batches[r['case']]:>6}{f(r['base_ms'], '.2f'):>10}{f(r['work_ms'], '.2f'):>10}"
                     f"{f(r['ratio'], '.3f'):>11}{spread[0]:>13}{spread[1]:>13}  {r['verdict']:<12}{ref:>18}")
    lines += [f"  {r['case']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines)


# ---------------------------------------------------------------- the run

def machine_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                load_average_at_start=list(os.getloadavg()))


def write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def pick_cases(names: Optional[List[str]]) -> Dict[str, List[str]]:
    """group -> labels asked for (a name may be a whole group, e.g. ``ref/b32``)."""
    chosen: Dict[str, List[str]] = {}
    for name in names or list(CASES):
        hits = [c for c in CASES if c == name or c.startswith(name.rstrip("/") + "/")]
        if not hits:
            raise SystemExit(f"guard: --cases: no case {name!r} (see --list)")
        for c in hits:
            g, label = CASES[c]
            labels = chosen.setdefault(g, [])
            if label not in labels:
                labels.append(label)
    return chosen


def group_images(chosen: Dict[str, List[str]], tmp: Path, record: dict) -> Dict[str, Optional[Path]]:
    """Per group, the file of its real images (written by the working tree), or None (random ones)."""
    files = {}
    for g in chosen:
        group = GROUPS[g]
        files[g] = tmp / f"images-{group.model}-{group.batch}.safetensors" if group.real_images else None
        if files[g] and not files[g].is_file():
            made = run_child(WORK_SRC, dict(model=group.model, batch=group.batch, out=str(files[g])), "--images")
            if "failed" in made:
                raise SystemExit(f"guard: cannot make the images of {g}: {made['failed']}")
            record["groups"][g].update(made)
    return files


def run_rounds(args, base_src: Path, chosen: Dict[str, List[str]], record: dict, out: Path) -> None:
    """``args.rounds`` rounds; each group's two children in alternating order; saved after every round."""
    from tqdm import tqdm
    sides = [("base", base_src), ("work", WORK_SRC)]
    images = group_images(chosen, base_src.parent, record)
    specs = {g: child_spec(GROUPS[g], needed_labels(GROUPS[g], labels), args, images[g])
             for g, labels in chosen.items()}
    with tqdm(total=args.rounds * len(specs) * 2, desc="guard", unit="process") as bar:
        for i in range(args.rounds):
            order = sides if i % 2 == 0 else sides[::-1]
            rnd = dict(round=i, order=[s for s, _ in order], groups={g: {} for g in specs})
            for g, spec in specs.items():
                for side, src in order:
                    bar.set_postfix_str(f"{g} {side}")
                    rnd["groups"][g][side] = run_child(src, spec)
                    bar.update()
            record["rounds"].append(rnd)
            write_atomic(out, record)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="commit to compare with (default: main; on main, HEAD if src/ is "
                                  "modified, else HEAD~1)")
    p.add_argument("--cases", nargs="+", help="case names or groups (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--rounds", type=int, default=7, help="child processes per side and group (default 7)")
    p.add_argument("--repeats", type=int, default=5, help="timings per runner in a child; their median (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed timings per runner first (default 2)")
    p.add_argument("--forwards", type=int, help="forwards per timing (default: the case's, 1 to 32)")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads (default 2)")
    p.add_argument("--tolerance", type=float, default=0.03, help="ratio beyond 1 +- this is a change (default 0.03)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images (DeiT-S)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/guard/<date>_<base>_<head>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.rounds, args.repeats, args.threads, args.forwards or 1) < 1 or args.warmup < 0 \
            or not 0 <= args.tolerance < 1:
        p.error("--rounds, --repeats, --forwards and --threads must be >= 1, --warmup >= 0, --tolerance in [0, 1)")
    return args


def list_cases() -> str:
    lines = []
    for name, (g, label) in CASES.items():
        group, r = GROUPS[g], GROUPS[g].runners[label]
        what = ("timm's own forward" if r.method is None and not r.floor_of else
                f"random floor of {r.floor_of}" if r.floor_of else
                " ".join([r.method, *(f"{k}={v}" for k, v in r.options.items()),
                          *(["shipped weights"] if r.shipped else [])]))
        lines.append(f"{name:<26} {group.model}, batch {group.batch}: {what}")
    return "\n".join(lines)


SETTINGS = ("rounds", "repeats", "warmup", "forwards", "threads", "tolerance", "seed")


def new_record(args, argv, base: str, chosen: Dict[str, List[str]]) -> dict:
    """The result file's header: command, date, machine, both commits, settings, groups."""
    base_sha, head_sha = resolve(base), resolve("HEAD")
    return dict(command=" ".join(["benchmarks/guard.py", *(argv if argv is not None else sys.argv[1:])]),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=machine_info(),
                base=dict(ref=base, commit=base_sha),
                work=dict(commit=head_sha, src_modified=bool(git("status", "--porcelain", "--", "src"))),
                settings={k: getattr(args, k) for k in SETTINGS},
                groups={g: dict(model=GROUPS[g].model, batch=GROUPS[g].batch,
                                forwards=args.forwards or GROUPS[g].forwards) for g in chosen},
                rounds=[])


def finish(record: dict, chosen: Dict[str, List[str]], tolerance: float) -> List[dict]:
    """The summary rows, added to the record with the torch version and the load at the end."""
    rows = [summarise(record["rounds"], g, label, GROUPS[g].runners[label].reference, tolerance)
            for g, labels in chosen.items() for label in labels]
    children = [out for r in record["rounds"] for sides in r["groups"].values() for out in sides.values()]
    record.update(summary=rows, torch=next((c["torch"] for c in children if "torch" in c), None))
    record["machine"]["load_average_at_end"] = list(os.getloadavg())
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child or args.images:
        print(json.dumps(child_main(json.loads(args.child)) if args.child else write_images(json.loads(args.images))))
        return 0
    if args.list:
        print(list_cases())
        return 0
    chosen = pick_cases(args.cases)
    base = args.base or default_base()
    record = new_record(args, argv, base, chosen)
    base_sha, head_sha, dirty = record["base"]["commit"], record["work"]["commit"], record["work"]["src_modified"]
    out = args.out or RESULTS / (f"{time.strftime('%Y-%m-%d_%H%M%S', time.gmtime())}_{base_sha[:8]}_vs_"
                                 f"{head_sha[:8]}{'-dirty' if dirty else ''}.json")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the with: the base copy is removed
    try:
        with tempfile.TemporaryDirectory(prefix="leanvit-guard-") as tmp:
            run_rounds(args, materialise(base_sha, Path(tmp)), chosen, record, out)
    except KeyboardInterrupt:
        print(f"guard: interrupted; {len(record['rounds'])} finished round(s) in {out}", file=sys.stderr)
        return 130
    rows = finish(record, chosen, args.tolerance)
    write_atomic(out, record)
    print(f"base {base} ({base_sha[:10]}) vs working tree ({head_sha[:10]}{', src modified' if dirty else ''}); "
          f"{args.threads} threads, {args.rounds} rounds x {args.repeats} repeats; load average "
          f"{record['machine']['load_average_at_start'][0]:.2f} at start, "
          f"{record['machine']['load_average_at_end'][0]:.2f} at the end")
    print(format_rows(rows, {f"{g}/{k}": GROUPS[g].batch for g, ks in chosen.items() for k in ks}))
    print(f"raw rounds: {out}")
    return 1 if any(r["verdict"] in ("slower", "slower?", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
