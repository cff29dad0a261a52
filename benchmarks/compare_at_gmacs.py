"""Top-1 of every method's curve at the same GMACs, from `leanvit sweep` results (JSON).

Each method's (GMACs, top-1) points (one curve per method and option family, every results file
merged) are sorted by GMACs and linearly interpolated at the requested GMACs; a value outside a
curve's range is left blank rather than extrapolated.

    python benchmarks/compare_at_gmacs.py RESULTS.json [RESULTS.json ...] --at 0.10 0.12 0.14 \
        [--plot PNG --curves tome evit ...]

``--plot`` draws the curves (all, or those whose name starts with one of ``--curves``) as one
Pareto plot.
"""
import argparse
import json
from collections import defaultdict


def curve_key(row: dict) -> str:
    """Curves: one per method, PPT split by threshold and layers (they are different families)."""
    opts = {k: v for k, v in row["options"].items() if k not in ("r", "keep_rate", "tokens")}
    return row["method"] + "".join(f" {k}={v}" for k, v in sorted(opts.items()))


def interpolate(points, g):
    points = sorted(points)
    for (g0, t0), (g1, t1) in zip(points, points[1:]):
        if g0 <= g <= g1:
            return t0 if g1 == g0 else t0 + (t1 - t0) * (g - g0) / (g1 - g0)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--at", nargs="+", type=float, required=True, help="GMACs per image")
    ap.add_argument("--plot", help="write a Pareto plot of the curves here")
    ap.add_argument("--curves", nargs="+", help="only curves whose name starts with one of these (plot)")
    ap.add_argument("--title")
    args = ap.parse_args()
    curves, dense, points = defaultdict(list), None, []
    for path in args.results:
        r = json.load(open(path))
        dense = dense or r["dense"]
        for row in r["rows"]:
            curves[curve_key(row)].append((row["gmacs"], row["top1"]))
            budget = {k: v for k, v in row["options"].items() if k in ("r", "keep_rate", "tokens")}
            points.append(dict(method=curve_key(row), gmacs=row["gmacs"], top1=row["top1"],
                               label=" ".join(f"{k}={v}" for k, v in budget.items())))
    if args.plot:
        from leanvit.report import pareto_plot
        keep = [p for p in points if not args.curves or any(p["method"].startswith(c) for c in args.curves)]
        pareto_plot(keep, args.plot, title=args.title, dense=dense)
    print(f"dense: {dense['top1']:.2f}% at {dense['gmacs']:.3f} GMACs")
    print("| curve | " + " | ".join(f"{g:.3f} G" for g in args.at) + " |")
    print("|---|" + "---:|" * len(args.at))
    for key in sorted(curves):
        vals = [interpolate(curves[key], g) for g in args.at]
        print(f"| {key} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
