"""Comparisons at equal cost: curves read at equal GMACs, settings matched by GMACs, and random
tokens at a method's own counts (`leanvit.analysis`, `leanvit compare`, `leanvit match`)."""
import json

import pytest
import torch

import leanvit
from conftest import CIFAR, images, small_vit
from leanvit.analysis import (at_gmacs, curve_key, format_at_gmacs, interpolate, match_gmacs, mean_tokens,
                              random_control)
from leanvit.cli import main
from leanvit.flops import tokens_per_block
from leanvit.methods.base import OptionError


def test_interpolate_is_linear_inside_and_blank_outside():
    pts = [(2.0, 70.0), (1.0, 60.0), (3.0, 71.0)]  # unsorted on purpose
    assert interpolate(pts, 1.5) == pytest.approx(65.0)
    assert interpolate(pts, 2.5) == pytest.approx(70.5)
    assert interpolate(pts, 1.0) == 60.0 and interpolate(pts, 3.0) == 71.0
    assert interpolate(pts, 0.99) is None and interpolate(pts, 3.01) is None
    assert interpolate([(1.0, 5.0)], 1.0) == 5.0 and interpolate([(1.0, 5.0)], 1.1) is None


def _row(method, gmacs, top1, **options):
    return dict(method=method, options=options, gmacs=gmacs, top1=top1, agreement=top1 + 10, label="")


def test_curves_split_by_non_budget_options_and_merge_files():
    a = dict(dense=dict(gmacs=1.0, top1=80.0), rows=[_row("tome", 0.5, 70.0, r=8), _row("ppt", 0.6, 72.0, r=5),
                                                     _row("ppt", 0.6, 75.0, r=5, threshold="scaled")])
    b = dict(dense=dict(gmacs=1.0, top1=80.0), rows=[_row("tome", 0.9, 78.0, r=2),
                                                     _row("ppt", 0.8, 79.0, r=1, threshold="scaled")])
    assert curve_key(a["rows"][2]) == "ppt threshold=scaled"
    table = at_gmacs([a, b], [0.7])
    assert table["tome"] == [pytest.approx(74.0)]  # 70 at 0.5 and 78 at 0.9, from two files
    assert table["ppt threshold=scaled"] == [pytest.approx(77.0)]
    assert table["ppt"] == [None]  # one point, not at 0.7: never extrapolated
    assert at_gmacs([a, b], [0.7], metric="agreement")["tome"] == [pytest.approx(84.0)]
    text = format_at_gmacs(table, [0.7], a["dense"])
    assert "| tome | 74.00 |" in text and "0.70)" in text


def test_match_gmacs_picks_the_closest_setting():
    model = small_vit()
    x = images(1)
    dense = leanvit.count_macs(model, x)
    target = 0.6 * dense
    matched = match_gmacs(model, target, x, methods=("tome", "evit"))
    for m, (text, g) in matched.items():
        spec = leanvit.options.parse_spec(text)
        assert g == pytest.approx(leanvit.count_macs(leanvit.adapt(model, spec.method, **spec.options), x))
        # no other setting of the grid is closer
        for other in leanvit.analysis.BUDGET_GRIDS[m]:
            o = leanvit.options.parse_spec(other)
            try:
                og = leanvit.count_macs(leanvit.adapt(model, o.method, **o.options), x)
            except OptionError:
                continue
            assert abs(og - target) >= abs(g - target) - 1e-12
    assert abs(matched["evit"][1] / target - 1) < 0.05
    with pytest.raises(OptionError, match="no budget grid"):
        match_gmacs(model, target, x, methods=("rl4evit",))


def test_random_control_runs_at_the_methods_mean_counts():
    torch.manual_seed(0)
    model = small_vit(sharp=4.0)
    ats = leanvit.adapt(model, "ats", tokens=30)
    batches = [images(8, seed=s) for s in (1, 2)]
    counts, gmacs, n = mean_tokens(ats, batches)
    assert n == 16 and len(counts) == len(model.blocks)
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0]
    spec = leanvit.options.parse_spec(random_control(counts, n_prefix=1))
    rnd = leanvit.adapt(model, spec.method, **spec.options)
    with torch.no_grad(), rnd.tracing() as trace:
        rnd(batches[0])
    got = tokens_per_block(trace).double().mean(1)
    assert torch.allclose(got, torch.tensor(counts, dtype=torch.float64).round().clamp(min=2), atol=0)
    assert gmacs == pytest.approx(sum(leanvit.count_macs(ats, b) for b in batches) / 2, rel=1e-6)


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_compare_reads_sweep_results(tmp_path, capsys):
    a = dict(dense=dict(gmacs=1.0, top1=80.0), rows=[_row("tome", 0.5, 70.0, r=8), _row("tome", 0.9, 78.0, r=2)])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(a))
    code, out, err = _run(["compare", str(path), "--of-dense", "0.7", "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 0, err
    assert "| tome | 74.00 |" in out and (tmp_path / "p.png").stat().st_size > 1000
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, out, err = _run(["compare", str(bad), "--gmacs", "0.5"], capsys)
    assert code == 2 and "not a `leanvit sweep` results.json" in err and len(err.strip().splitlines()) == 1


def test_cli_match(capsys):
    code, out, err = _run(["match", "--model", "vit12_convstem_w96_cifar", "--of-dense", "0.6",
                           "--methods", "tome", "evit"], capsys)
    assert code == 0, err
    assert "target:" in out and "tome:r=" in out and "evit:keep_rate=" in out
    code, out, err = _run(["match", "--model", "vit12_convstem_w96_cifar", "--method", "ats:tokens=30"], capsys)
    assert code == 2 and "--method needs --data" in err
    code, out, err = _run(["match", "--model", "vit12_convstem_w96_cifar", "--method", "ats:tokens=30",
                           "--data", str(CIFAR), "--limit", "20", "--batch-size", "10", "--workers", "0",
                           "--methods", "tome"], capsys)
    assert code == 0, err
    assert "random at these counts: random:schedule=" in out and "mean tokens per block:" in out
