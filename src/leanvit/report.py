"""Figures and tables of results: accuracy/GMACs Pareto plots, training curves, plain-text tables
(token maps: :mod:`leanvit.token_maps`).

    from leanvit.report import pareto_plot, format_sweep_table
    pareto_plot(results, "runs/pareto.png", dense={"gmacs": 4.6, "top1": 79.8})
    print(format_sweep_table(rows, dense))
    training_curves(metrics["curve"], "runs/rl/curves.png", budget=0.5)  # a policy training's batches

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, the global
backend is left alone).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


# --------------------------------------------------------------------------- shared helpers
def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi: int = 130) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _get(row, key, default=None):
    """A field of a result given as a dict or as an object (e.g. an EvalResult)."""
    if isinstance(row, Mapping):
        return row.get(key, default)
    return getattr(row, key, default)


# --------------------------------------------------------------------------- training curves
def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < window:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:window] / np.arange(1, window)  # a growing window until it is full
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def training_curves(curve: Sequence[Mapping], path, budget: Optional[float] = None,
                    title: Optional[str] = None, cost: str = "alpha") -> str:
    """A policy training's per-batch curves (``metrics.json``'s ``curve`` of ``train-policy``):
    the mean reward per image (top), the kept fraction of the sampled actions and, when recorded,
    the greedy policy's GMACs ratio with the budget as a line (middle), and the cost weight
    (bottom), recorded under ``cost`` (RL4EViT's alpha, PRANCE's cost_weight). Thin lines are the batches, thick ones their running mean over 10 batches."""
    steps = [r["step"] for r in curve]
    fig = new_figure(7.0, 7.5)
    axes = fig.subplots(3, 1, sharex=True)
    panels = [(axes[0], [("reward", "mean reward per image", "C0")]),
              (axes[1], [("keep", "kept fraction (sampled)", "C1"), ("gmacs_ratio", "GMACs / dense (greedy)", "C2")]),
              (axes[2], [(cost, cost, "C3")])]
    for ax, series in panels:
        for key, label, color in series:
            ys = [r.get(key) for r in curve]
            if not ys or any(y is None for y in ys):
                continue
            ax.plot(steps, ys, color=color, lw=0.6, alpha=0.35)
            ax.plot(steps, _smooth(ys, 10), color=color, lw=1.8, label=label)
        ax.grid(alpha=0.3)
    if budget is not None:
        axes[1].axhline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g}")
    for ax in axes[:2]:
        ax.legend(loc="best", fontsize=8)
    axes[0].set_ylabel("reward")
    axes[1].set_ylabel("fraction")
    axes[2].set_ylabel(cost)
    axes[2].set_xlabel("batch")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Pareto plot
_MARKERS = "osD^vP<>Xph"


def pareto_plot(results: Sequence[Mapping], path, title: Optional[str] = None,
                dense: Optional[Mapping] = None) -> str:
    """Top-1 against GMACs per image: one line per method, each point labelled with its budget;
    next to it, where the results carry ``kl_to_dense``, KL to the dense model against GMACs
    (log scale), which separates methods that top-1 on a few thousand images cannot.

    ``results``: dicts with ``method``, ``label`` (e.g. "r=50"), ``gmacs``, ``top1`` (percent) and
    optionally ``kl_to_dense``. ``dense``: optional dict with ``gmacs`` and ``top1`` of the
    unreduced model, drawn as a star. Writes a PNG (parent folders are created), returns ``path``.
    """
    by_method: Dict[str, List[Mapping]] = {}
    for r in results:
        by_method.setdefault(str(_get(r, "method")), []).append(r)
    with_kl = [r for r in results if _get(r, "kl_to_dense") is not None]
    panels = [("top1", "top-1 (%)")] + ([("kl_to_dense", "KL(dense || method), nats")] if with_kl else [])

    fig = new_figure(7.0 * len(panels), 5.0)
    for k, (key, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for i, (method, pts) in enumerate(by_method.items()):
            pts = sorted((p for p in pts if _get(p, key) is not None), key=lambda p: float(_get(p, "gmacs")))
            xs = [float(_get(p, "gmacs")) for p in pts]
            ys = [max(float(_get(p, key)), 1e-6) if key == "kl_to_dense" else float(_get(p, key)) for p in pts]
            color = f"C{i % 10}"
            ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], color=color, label=method,
                    linewidth=1.5, markersize=6)
            for p, x, y in zip(pts, xs, ys):
                label = _get(p, "label")
                if label not in (None, ""):
                    ax.annotate(str(label), (x, y), xytext=(4, 4), textcoords="offset points",
                                fontsize=7, color=color)
        if dense is not None and key == "top1":
            x, y = float(_get(dense, "gmacs")), float(_get(dense, "top1"))
            ax.plot([x], [y], marker="*", color="black", markersize=15, linestyle="none",
                    label=str(_get(dense, "method", None) or "dense"))
            ax.annotate(f"{y:.1f}%", (x, y), xytext=(6, -10), textcoords="offset points", fontsize=7)
        if key == "kl_to_dense":
            ax.set_yscale("log")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.35)
        ax.margins(x=0.08, y=0.08)
        if by_method or dense is not None:
            ax.legend(fontsize=8, loc="best")
        ax.set_title((title if title is not None else "accuracy vs. compute") if k == 0 else "fidelity to dense")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- table
def format_sweep_table(rows: Sequence[Mapping], dense: Mapping) -> str:
    """A plain-text table: method, budget, top-1 %, change vs dense (points; ``*`` where its paired
    95% interval excludes 0), agreement with dense %, KL to dense, GMACs, speedup.

    ``rows`` and ``dense``: dicts (or :class:`~leanvit.evaluate.EvalResult`) with ``method``,
    ``label``, ``top1``, ``gmacs``, ``images_per_second`` and, from an evaluation against dense,
    ``delta_top1_ci95``, ``agreement``, ``kl_to_dense`` and ``speedup``. The dense model is the
    first line.
    """
    d_top1 = float(_get(dense, "top1"))
    d_ips = _get(dense, "images_per_second")

    def line(r, is_dense=False):
        top1 = float(_get(r, "top1"))
        speedup = _get(r, "speedup")
        if speedup is None and _get(r, "images_per_second") and d_ips:
            speedup = float(_get(r, "images_per_second")) / float(d_ips)
        lo, hi = _get(r, "delta_top1_ci95") or (0.0, 0.0)
        agreement, kl, gmacs = _get(r, "agreement"), _get(r, "kl_to_dense"), _get(r, "gmacs")
        return [str(_get(r, "method", "") or ("dense" if is_dense else "")),
                str(_get(r, "label", "") or ""),
                f"{top1:.2f}",
                "-" if is_dense else f"{top1 - d_top1:+.2f}" + ("*" if lo > 0 or hi < 0 else " "),
                "-" if is_dense or agreement is None else f"{float(agreement):.2f}",
                "-" if is_dense or kl is None else f"{float(kl):.4f}",
                "-" if gmacs is None else f"{float(gmacs):.3f}",
                "-" if speedup is None else f"{float(speedup):.2f}x"]

    header = ["method", "budget", "top-1 %", "vs dense", "agree %", "KL", "GMACs", "speedup"]
    body = [line(dense, True)] + [line(r) for r in rows]
    widths = [max(len(c[i]) for c in [header] + body) for i in range(len(header))]
    left = {0, 1}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths), fmt(body[0])]
    if len(body) > 1:
        out.append("  ".join("-" * w for w in widths))
        out.extend(fmt(c) for c in body[1:])
    if any(_get(r, "delta_top1_ci95") is not None for r in rows):
        out.append("* the paired 95% interval of the top-1 difference excludes 0; agree % and KL(dense || method) "
                   "are measured on the same images")
    return "\n".join(out) + "\n"


def format_floor_table(rows: Sequence[Mapping], kind: str = "random") -> str:
    """The rows with a random floor (``sweep --random-floor``): each method against random tokens at
    its own per-image counts and widths, on the same images: the floor's top-1, agreement and KL,
    and the paired differences method - floor (``*``: the 95% interval excludes 0). ``kind``
    "shuffled": against the shuffled floor (``--shuffled-floor``), those counts and widths dealt to
    the images in a random order."""
    floor, versus = f"{kind}_floor", f"vs_{kind}_floor"
    header = ["method", "budget", "floor top-1", "floor agree", "floor KL", "KL - floor [95%]",
              "agree - floor [95%]", "top-1 - floor [95%]"]

    def diff(v: Mapping, key: str, digits: int) -> str:
        lo, hi = v[key + "_ci95"]
        return f"{v[key]:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" + ("*" if lo > 0 or hi < 0 else " ")

    body = [[str(_get(r, "method", "")), str(_get(r, "label", "") or ""), f"{r[floor]['top1']:.2f}",
             f"{r[floor]['agreement']:.2f}", f"{r[floor]['kl_to_dense']:.4f}",
             diff(r[versus], "kl_to_dense", 4), diff(r[versus], "agreement", 2), diff(r[versus], "top1", 2)]
            for r in rows if _get(r, versus)]
    widths = [max(len(c[i]) for c in [header] + body) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(c) for c in body]
    what = ("random tokens at the method's own per-image counts and widths" if kind == "random" else
            "the method's per-image counts and widths of the batch dealt to its images in a random order, random tokens")
    out.append(f"{kind} floor: {what}, same images; * the paired 95% interval of the difference excludes 0 "
               "(KL below the floor's: the method's choice beats it)")
    return "\n".join(out) + "\n"
