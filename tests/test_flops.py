"""leanvit.count_macs: the papers' GMACs at 224x224, agreement with torch's FlopCounterMode on what
actually ran, padded vs per-image counts of ragged batches, and per-image averaging."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import leanvit

from conftest import AboveMean, deit, images, run_traced, small_vit


def measured_macs(f, x) -> float:
    """MACs per image counted by torch (SDPA through the MATH backend so its matmuls are counted)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        f(x)
    return counter.get_total_flops() / 2 / x.shape[0]


# --------------------------------------------------------------------------- paper numbers (224x224)
PAPER = [
    ("tiny", "none", {}, 1.25),
    ("small", "none", {}, 4.60),
    ("base", "none", {}, 17.56),
    ("tiny", "ppt", dict(r=50, layers=(3, 6, 9)), 0.80),
    ("small", "ppt", dict(r=50, layers=(3, 6, 9)), 2.94),
    ("base", "ppt", dict(r=47, layers=(3, 6, 9)), 11.59),
    ("small", "evit", dict(keep_rate=0.7, fuse=True), 3.03),
    ("base", "evit", dict(keep_rate=0.7, fuse=True), 11.61),
    ("small", "tome", dict(r=13), 2.70),
]


@pytest.mark.parametrize("size, method, opts, gmacs", PAPER,
                         ids=[f"deit_{s}-{m}-{g}" for s, m, _, g in PAPER])
def test_paper_gmacs(size, method, opts, gmacs, x224):
    f = leanvit.adapt(deit(size), method, **opts)
    with torch.no_grad():
        assert leanvit.count_macs(f, x224) == pytest.approx(gmacs, abs=0.01)


def test_dense_count_matches_closed_form():
    """Patch embedding + per block N(4D^2 + 2*D*hidden) + 2N^2 D + head, for a small model."""
    m = small_vit(num_classes=10)  # 65 tokens, D=64, hidden 256, depth 12
    n, d, h = 65, 64, 256
    embed = 64 * (3 * 4 * 4) * d
    block = n * (3 * d * d + d * d) + 2 * n * n * d + n * 2 * d * h
    expected = embed + 12 * block + d * 10
    assert leanvit.count_macs(m, images(2)) * 1e9 == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- analytic == measured
MEASURED_CASES = [
    ("none", {}),
    ("tome", dict(r=4)),
    ("tome", dict(r=(8, 0.5))),
    ("evit", dict(keep_rate=0.7, fuse=True)),
    ("evit", dict(keep_rate=0.5, fuse=False)),
    ("ppt", dict(r=10, threshold=1e9)),  # pool
    ("ppt", dict(r=10, threshold=1e-30)),  # prune
    ("ppt", dict(r=10, threshold="scaled")),
    ("random", dict(keep_rate=0.6, independent=False)),
    ("random", dict(schedule=[65, 60, 60, 50, 50, 50, 30, 30, 20, 20, 10, 10])),
]


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("method, opts", MEASURED_CASES, ids=[f"{m}-{o}" for m, o in MEASURED_CASES])
def test_analytic_equals_measured_small(method, opts, distilled):
    f = leanvit.adapt(small_vit(sharp=3.0, distilled=distilled), method, **opts)
    x = images(3)
    if method == "random":
        f.method.generator.manual_seed(0)
    analytic = leanvit.count_macs(f, x) * 1e9
    if method == "random":
        f.method.generator.manual_seed(0)
    measured = measured_macs(f, x)
    assert measured == pytest.approx(analytic, rel=0.01)
    assert analytic <= measured  # what is not counted analytically (scoring) only adds
    assert leanvit.count_macs(f, x, padded=True) == pytest.approx(analytic / 1e9, rel=1e-12)


@pytest.mark.parametrize("method, opts", [("none", {}), ("ppt", dict(r=50)), ("tome", dict(r=13)),
                                          ("evit", dict(keep_rate=0.7))])
def test_analytic_equals_measured_deit_tiny_224(method, opts, x224):
    f = leanvit.adapt(deit("tiny"), method, **opts)
    analytic = leanvit.count_macs(f, x224) * 1e9
    assert measured_macs(f, x224) == pytest.approx(analytic, rel=0.01)


def test_measurement_counts_attention_only_with_math_backend():
    """Sanity check of the measurement itself: through the fused CPU kernel FlopCounterMode misses the
    attention matmuls (exactly 2*N^2*D per block); through the MATH backend it sees them."""
    f = leanvit.adapt(small_vit(), "none")
    x = images(2)
    analytic = leanvit.count_macs(f, x) * 1e9
    attn = 12 * 2 * 65 * 65 * 64
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        f(x)
    assert c.get_total_flops() / 2 / 2 in (pytest.approx(analytic - attn, rel=1e-9), pytest.approx(analytic))
    assert measured_macs(f, x) == pytest.approx(analytic, rel=1e-9)


# --------------------------------------------------------------------------- learned decisions
def _learned(method, **opts):
    """RL4EViT or DynamicViT on the small ViT; RL4EViT's actor biased to prune about half."""
    f = leanvit.adapt(small_vit(sharp=4.0), method, **opts)
    if method == "rl4evit":
        with torch.no_grad():
            f.method.actor[-1].bias.zero_()
    return f


LEARNED = [("rl4evit", {}), ("rl4evit", dict(agents="single")), ("dynamicvit", dict(keep_rate=0.6))]


@pytest.mark.parametrize("method, opts", LEARNED, ids=[f"{m}-{o}" for m, o in LEARNED])
def test_decision_networks_analytic_equals_measured(method, opts):
    """The actor / predictors are counted: analytic == FlopCounterMode per image, and for the
    batch as executed (padded=True: a packed ragged batch pads attention, and the actor scores padding)."""
    f = _learned(method, **opts)
    x = images(4)
    alone = []
    for i in range(4):
        alone.append(leanvit.count_macs(f, x[i:i + 1]) * 1e9)
        assert measured_macs(f, x[i:i + 1]) == pytest.approx(alone[-1], rel=1e-9)
    assert leanvit.count_macs(f, x) * 1e9 == pytest.approx(sum(alone) / 4, rel=1e-9)
    assert measured_macs(f, x) == pytest.approx(leanvit.count_macs(f, x, padded=True) * 1e9, rel=1e-9)
    if method == "rl4evit":
        assert len(set(alone)) > 1 and leanvit.count_macs(f, x, padded=True) > leanvit.count_macs(f, x)


@pytest.mark.parametrize("method", ["rl4evit", "dynamicvit"])
def test_gmacs_include_the_decision_network(method):
    """What the decision network adds to the ViT on the same tokens: exactly its linear MACs per
    token (hand-computed for width 64) times the live patches it scored, per image."""
    from leanvit.flops import linear_macs, tokens_per_block
    from leanvit.measure import macs_per_image
    f = _learned(method) if method == "rl4evit" else _learned(method, keep_rate=0.6)
    x = images(5)
    with torch.no_grad(), f.tracing() as trace:
        f(x)
    vit_only = macs_per_image(f, [rec for rec in trace if rec["layer"] is not None], x)
    patches = tokens_per_block(trace)[list(f.method.decision_layers())] - 1  # scored at each decision
    if method == "rl4evit":
        per_token = [64 * 256 + 256 * 256 + 256 * 64 + 64 * 2] * 3  # actor 64-256-256-64-2
        assert linear_macs(f.method.actor) == per_token[0]
    else:
        per_token = [64 * 64 + 64 * 32 + 32 * 16 + 16 * 2] * 3  # in_conv C x C, out_conv C -> C/2 -> C/4 -> 2
        assert [linear_macs(p) for p in f.method.predictors] == per_token
    extra = (patches.double() * torch.tensor(per_token, dtype=torch.float64)[:, None]).sum(0)
    assert torch.equal(macs_per_image(f, trace, x), vit_only + extra)
    assert leanvit.count_macs(f, x) * 1e9 == pytest.approx(float((vit_only + extra).mean()), rel=1e-12)
    if method == "rl4evit":
        assert len(set(extra.tolist())) > 1  # per image: each scored its own live patches


def test_note_macs_numbers_and_tensors():
    from leanvit.measure import macs_per_image
    f = leanvit.adapt(small_vit(), "none")
    x = images(3)
    with torch.no_grad(), f.tracing() as trace:
        f(x)
    base = macs_per_image(f, trace, x)
    f._trace = trace
    f.note_macs(10)
    f.note_macs(torch.tensor([1, 2, 3]), padded=torch.tensor([3, 3, 3]))
    f.note_macs(torch.tensor([100, 0, 200]))
    f._trace = None
    assert (macs_per_image(f, trace, x) - base).tolist() == [111, 12, 213]
    assert (macs_per_image(f, trace, x, padded=True) - base).tolist() == [113, 13, 213]


# --------------------------------------------------------------------------- ragged batches
@pytest.mark.parametrize("method, opts", [
    ("ats", {}),
    ("ats", dict(tokens=20)),
    ("random", dict(keep_rate=0.6, independent=True)),
    (AboveMean((3, 5, 7, 9)), {}),
], ids=["ats", "ats-20", "random-independent", "above-mean"])
def test_ragged_measured_equals_padded(method, opts):
    f = leanvit.adapt(small_vit(sharp=4.0), method, **opts)
    x = images(4)
    is_random = getattr(f.method, "name", "") == "random"
    if is_random:
        f.method.generator.manual_seed(0)
    padded = leanvit.count_macs(f, x, padded=True) * 1e9
    if is_random:
        f.method.generator.manual_seed(0)
    unpadded = leanvit.count_macs(f, x) * 1e9
    if is_random:
        f.method.generator.manual_seed(0)
    _, trace, state = run_traced(f, x, track_source=False)
    assert state.valid is not None  # really ragged
    if is_random:
        f.method.generator.manual_seed(0)
    measured = measured_macs(f, x)
    assert measured == pytest.approx(padded, rel=0.01)
    assert padded > unpadded
    assert measured > unpadded * 1.0001


def test_count_macs_plain_model_equals_adapt_none():
    for m in [small_vit(), small_vit(distilled=True), small_vit(global_pool="avg", class_token=False),
              small_vit(reg_tokens=4, depth=5), deit("tiny")]:
        x = images(2, m.patch_embed.img_size)
        assert leanvit.count_macs(m, x) == leanvit.count_macs(leanvit.adapt(m, "none"), x)


def test_count_macs_per_image_average_ragged():
    """count_macs of a ragged batch is the mean of the per-image counts (each image alone)."""
    for method in [leanvit.build_method("ats", layers=(3,)), AboveMean((3, 5, 7, 9))]:
        f = leanvit.adapt(small_vit(sharp=4.0), method)
        x = images(5)
        alone = [leanvit.count_macs(f, x[i:i + 1]) for i in range(5)]
        assert len(set(alone)) > 1
        assert leanvit.count_macs(f, x) == pytest.approx(sum(alone) / 5, rel=1e-9)
        assert leanvit.count_macs(f, x, padded=True) > sum(alone) / 5  # attention over a group's padding


def test_count_macs_per_image_average_ragged_ats_all_layers():
    f = leanvit.adapt(small_vit(sharp=4.0), "ats")
    x = images(5)
    alone = [leanvit.count_macs(f, x[i:i + 1]) for i in range(5)]
    assert leanvit.count_macs(f, x) == pytest.approx(sum(alone) / 5, rel=1e-9)


def test_count_macs_dense_batch_independent():
    f = leanvit.adapt(small_vit(), "tome", r=5)
    assert leanvit.count_macs(f, images(1)) == leanvit.count_macs(f, images(7))


def test_count_macs_keeps_model_mode():
    m = small_vit()
    leanvit.count_macs(m, images(1))
    assert not m.training
    f = leanvit.adapt(m.eval(), "tome", r=3)
    leanvit.count_macs(f, images(1))
    assert not m.training


def test_count_macs_restores_train_mode():
    f = leanvit.adapt(small_vit(), "tome", r=3)
    f.train()
    leanvit.count_macs(f, images(1))
    assert f.training and f.model.training
