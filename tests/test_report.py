"""leanvit.report: Pareto plot, token maps (per-layer token states, restoration of the method),
plain-text table. Tiny random-weight models only."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import leanvit
from leanvit.report import format_sweep_table, pareto_plot
from leanvit.token_maps import record_token_states, token_maps

from conftest import images, seed_all, sharpen

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_vit(img_size=32, depth=12, patch_size=4):
    seed_all(0)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=depth,
                              num_heads=2, num_classes=10).eval()
    return sharpen(model, 4.0)


@pytest.fixture(scope="module")
def runners():
    model = tiny_vit()
    return {
        "tome": leanvit.adapt(model, "tome", r=4),
        "ppt": leanvit.adapt(model, "ppt", r=8, threshold="scaled"),
        "evit": leanvit.adapt(model, "evit", keep_rate=0.5),
        "ats": leanvit.adapt(model, "ats"),
    }


@pytest.fixture
def x():
    return images(2, 32, seed=1)


# --------------------------------------------------------------------------- Pareto plot
RESULTS = [
    dict(method="tome", label="r=4", gmacs=1.9, top1=78.1),
    dict(method="tome", label="r=8", gmacs=1.4, top1=76.0),
    dict(method="tome", label="r=2", gmacs=2.4, top1=79.0),
    dict(method="ppt", label="r=50", gmacs=2.0, top1=78.9),
    dict(method="evit", label="0.7", gmacs=3.0, top1=79.5),
]


def test_pareto_plot_writes_png(tmp_path):
    out = tmp_path / "nested" / "dir" / "pareto.png"
    got = pareto_plot(RESULTS, out, title="DeiT-S", dense=dict(gmacs=4.6, top1=79.8))
    assert got == str(out) and out.exists()
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 600 <= w <= 1400 and 400 <= h <= 1000 and w > h


def test_pareto_plot_one_point_per_method(tmp_path):
    pts = [dict(method="ppt", label="r=50", gmacs=2.0, top1=78.9),
           dict(method="evit", label="0.7", gmacs=3.0, top1=79.5)]
    out = pareto_plot(pts, tmp_path / "one.png")
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200


# --------------------------------------------------------------------------- token states
def _trace_counts(runner, x):
    with torch.inference_mode(), runner.tracing() as trace:
        runner(x)
    return {rec["layer"]: rec["mlp_tokens"].tolist() for rec in trace}


def test_recorded_states_token_counts(runners, x):
    n0 = 65
    expected = {
        "tome": [n0 - 4 * (i + 1) for i in range(12)],
        "ppt": [57, 49, 41],
        # ceil(0.5 * patches) kept + CLS + the fused token: 64 -> 32+2, 33 -> 17+2, 18 -> 9+2
        "evit": [math.ceil(0.5 * 64) + 2, math.ceil(0.5 * 33) + 2, math.ceil(0.5 * 18) + 2],
    }
    for name, runner in runners.items():
        recs = record_token_states(runner, x)
        assert [r.layer for r in recs] == sorted(runner.decision_layers), name
        trace = _trace_counts(runner, x)
        for rec in recs:
            assert rec.source.shape[0] == 2 and rec.source.shape[-1] == n0
            # the recorded state is what the block's MLP ran on
            assert rec.counts().tolist() == trace[rec.layer], (name, rec.layer)
            for b in range(2):
                src = rec.source[b] if rec.valid is None else rec.source[b][rec.valid[b]]
                assert torch.equal(src[0], torch.eye(n0)[0])  # CLS stays first and alone
                cover = src[:, 1:].sum(0)
                assert bool((cover <= 1).all()), (name, rec.layer)  # each patch in at most one token
                if name in ("tome", "evit"):  # merging / fusing loses no patch
                    assert bool((cover == 1).all())
                if rec.size is not None and rec.valid is None and name == "tome":
                    assert torch.equal(rec.size[b], src.sum(1))
        if name in expected:
            assert [r.counts().tolist() for r in recs] == [[c, c] for c in expected[name]], name
    ats = record_token_states(runners["ats"], x)
    assert [r.layer for r in ats] == list(range(3, 12))


def test_token_maps_png_restores_reduce_and_logits(runners, x, tmp_path):
    model = runners["tome"].model
    all_runners = dict(runners, random=leanvit.adapt(model, "random", keep_rate=0.6))
    originals = {k: type(r.method).reduce for k, r in all_runners.items()}
    gen = all_runners["random"].method.generator
    gen_state = gen.get_state()
    with torch.inference_mode():
        before = {k: r(x) for k, r in all_runners.items()}
    gen.set_state(gen_state)  # the random method draws again from the same point
    stats = {k: dict(v) for k, v in vars(all_runners["ppt"].method).items() if k.endswith("_counts")}

    out = token_maps(all_runners, x, tmp_path / "maps" / "tokens.png", image_mean=MEAN, image_std=STD)
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 200 < w <= 1600 and h > 200  # ats decides in 9 blocks: the panels shrink to stay in width

    for k, r in all_runners.items():
        assert "reduce" not in vars(r.method), k
        assert r.method.reduce.__func__ is originals[k], k
    assert {k: v for k, v in vars(all_runners["ppt"].method).items() if k.endswith("_counts")} == stats
    assert torch.equal(gen.get_state(), gen_state)
    with torch.inference_mode():
        after = {k: r(x) for k, r in all_runners.items()}
    for k in all_runners:
        assert torch.equal(before[k], after[k]), k


def test_reduce_restored_after_error(runners):
    r = runners["evit"]
    with pytest.raises(ValueError):
        record_token_states(r, images(2, 48))  # wrong image size: the forward raises
    assert "reduce" not in vars(r.method)
    assert r.method.reduce.__func__ is type(r.method).reduce


def test_token_maps_layers_subset_lines_up_methods(runners, x, tmp_path):
    sub = {k: runners[k] for k in ("tome", "ppt", "evit")}
    # block 2 comes before any ppt/evit decision: those panels show the input tokens
    two = token_maps(sub, x[:1], tmp_path / "two.png", layers=[2, 6])
    one = token_maps(sub, x[:1], tmp_path / "one.png", layers=[6])
    fewer = token_maps({k: sub[k] for k in ("tome", "ppt")}, x[:1], tmp_path / "fewer.png", layers=[2, 6])
    with Image.open(two) as a, Image.open(one) as b, Image.open(fewer) as c:
        (w2, h2), (w1, h1), (wf, hf) = a.size, b.size, c.size
    assert w2 > 1.3 * w1 and abs(h1 - h2) < 40  # a column per layer: 2 vs 1 (the caption may wrap once more)
    assert wf == w2 and hf < h2 - 100  # a row per method: 2 vs 3


def _text_boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list(fig.texts) + [ax.title for ax in fig.axes if ax.get_title()]
    return [t.get_window_extent(renderer) for t in texts], [ax.get_window_extent(renderer) for ax in fig.axes]


def test_token_maps_grid_has_no_overlapping_text_and_fits_in_width(runners, x):
    """One block per image (input on top, a row per method, a column per layer), blocks side by
    side within 1,600 pixels: no title or label runs into another, or into a picture."""
    import leanvit.token_maps as maps
    long_names = {"prance shipped selector, on its meta-network": runners["tome"],
                  "rl4evit shipped policy trained for 0.93 of dense": runners["ppt"], "evit keep=0.7": runners["evit"]}
    for layers, boxes in (([3, 6, 9], None), (None, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))):
        imgs = images(4, 32, seed=2)
        g, rows = maps._map_rows(long_names, imgs, layers)
        fig = maps._token_map_figure(maps._display_images(imgs, MEAN, STD), g, rows, boxes=boxes)
        assert fig.get_figwidth() * maps._MAP_DPI <= 1600
        assert len(fig.axes) == 4 * (1 + sum(len(p) for _, p in rows))  # input + one panel per method and layer
        texts, pictures = _text_boxes(fig)
        whole = fig.bbox
        for i, a in enumerate(texts):
            assert whole.x0 <= a.x0 and a.x1 <= whole.x1 and whole.y0 <= a.y0 and a.y1 <= whole.y1
            assert not any(a.overlaps(b) for b in texts[i + 1:])
            assert not any(a.overlaps(p) for p in pictures)


def _rectangles(ax):
    from matplotlib.patches import Rectangle
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_box_in_panel_scales_fractions_to_the_displayed_pixels():
    from leanvit.token_maps import _box_in_panel
    assert _box_in_panel(torch.tensor([0.25, 0.5, 0.75, 1.0]), 64, 32) == (16.0, 16.0, 32.0, 16.0)
    assert _box_in_panel([-0.1, 0.0, 1.2, 0.5], 10, 10) == (0.0, 0.0, 10.0, 5.0)  # clipped to the image


def test_token_maps_frame_each_images_box_on_every_panel_of_it(runners, tmp_path):
    """With boxes, every panel of an image (its input and each method's layers) holds one unfilled
    rectangle at that image's box in the panel's pixels; without them, none."""
    import leanvit.token_maps as maps
    imgs = images(2, 32, seed=3)
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.125, 0.5, 0.625]])
    sub = {k: runners[k] for k in ("tome", "evit")}
    g, rows = maps._map_rows(sub, imgs, [3, 9])
    disp = maps._display_images(imgs, MEAN, STD)
    per_image = 1 + sum(len(p) for _, p in rows)
    fig = maps._token_map_figure(disp, g, rows, boxes=boxes)
    assert len(fig.axes) == 2 * per_image
    for k, ax in enumerate(fig.axes):  # the axes of image 1, then of image 2
        box = boxes[k // per_image] * 32
        (rect,) = _rectangles(ax)
        assert not rect.get_fill() and rect.get_xy() == pytest.approx((float(box[0]), float(box[1])))
        assert (rect.get_width(), rect.get_height()) == pytest.approx((float(box[2] - box[0]), float(box[3] - box[1])))
    assert not any(_rectangles(ax) for ax in maps._token_map_figure(disp, g, rows).axes)
    assert token_maps(sub, imgs, tmp_path / "boxes.png", layers=[3, 9], boxes=boxes) == str(tmp_path / "boxes.png")
    with pytest.raises(ValueError, match="a box"):
        token_maps(sub, imgs, tmp_path / "bad.png", boxes=boxes[:1])
    assert not (tmp_path / "bad.png").exists()


def test_non_square_grid_raises(tmp_path):
    f = leanvit.adapt(tiny_vit(img_size=(32, 16), depth=3), "evit", keep_rate=0.5, layers=(1,))
    with pytest.raises(ValueError, match="square"):
        token_maps({"evit": f}, images(2, (32, 16)), tmp_path / "bad.png")
    # 16 patches (a square count) but laid out 8x2
    f = leanvit.adapt(tiny_vit(img_size=(64, 16), patch_size=8, depth=3), "evit", keep_rate=0.5, layers=(1,))
    with pytest.raises(ValueError, match="square"):
        token_maps({"evit": f}, images(2, (64, 16)), tmp_path / "bad2.png")
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- table
def test_format_table_delta_and_speedup():
    dense = dict(method="deit_s", label="dense", top1=79.8, gmacs=4.6, images_per_second=100.0)
    rows = [dict(method="ppt", label="r=50", top1=78.3, gmacs=2.9, images_per_second=185.0),
            dict(method="tome", label="r=13", top1=80.1, gmacs=3.0, images_per_second=150.5)]
    table = format_sweep_table(rows, dense)
    assert isinstance(table, str)
    lines = table.strip().splitlines()
    assert "method" in lines[0] and "speedup" in lines[0]
    assert "deit_s" in lines[2] and "1.00x" in lines[2]
    ppt = next(l for l in lines if l.startswith("ppt"))
    tome = next(l for l in lines if l.startswith("tome"))
    assert "-1.50" in ppt and "1.85x" in ppt and "r=50" in ppt and "2.900" in ppt
    assert "+0.30" in tome and "1.50x" in tome  # 150.5 / 100 rounds to 1.50 (2 decimals)


def test_training_curves_png(tmp_path):
    """train-policy's per-batch curve as a PNG, with the budget line when the GMACs ratio was
    recorded, and without it (no budget) too."""
    from PIL import Image
    from leanvit.report import _smooth, training_curves
    curve = [dict(step=i + 1, reward=1.0 + 0.1 * i, keep=0.5, alpha=0.03 + 0.001 * i, gmacs_ratio=1.0 - 0.02 * i)
             for i in range(25)]
    path = training_curves(curve, tmp_path / "c.png", budget=0.5, title="t")
    assert Image.open(path).size[0] > 500
    no_budget = [{k: v for k, v in c.items() if k != "gmacs_ratio"} for c in curve]
    assert Image.open(training_curves(no_budget, tmp_path / "d.png")).size == Image.open(path).size
    assert _smooth([1.0, 2.0, 3.0, 4.0], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
