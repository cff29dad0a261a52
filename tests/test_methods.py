"""The token-reduction methods and the pure token operations they are built from (leanvit.tokens):
registry and option validation, per-layer token counts, hand-made merge/prune/fuse cases,
and the decisions (scores, PPT policy) checked against independent computations."""
from __future__ import annotations

import math

import pytest
import torch

import leanvit
from leanvit import OptionError, TokenState
from leanvit.tokens import (bipartite_soft_matching, choose, fuse_rest, keep_first, keep_mask, keep_top, max_merge,
                            merge_into_first, merge_tokens, sort_by_score)

from conftest import deit, images, mlp_counts, run_traced, small_vit

METHODS = ["ats", "evit", "none", "ppt", "random", "tome"]


# --------------------------------------------------------------------------- registry and options
def test_list_methods():
    assert set(METHODS) <= set(leanvit.list_methods())
    assert leanvit.list_methods() == sorted(leanvit.list_methods())


def test_unknown_method_lists_known_ones():
    with pytest.raises(OptionError) as e:
        leanvit.adapt(small_vit(depth=2), "dynamicvitt")
    msg = str(e.value)
    assert "dynamicvitt" in msg
    for name in METHODS:
        assert name in msg


def test_unknown_option_is_named():
    with pytest.raises(OptionError) as e:
        leanvit.adapt(small_vit(depth=2), "evit", keep_ratio=0.7)
    assert "keep_ratio" in str(e.value) and "keep_rate" in str(e.value)
    with pytest.raises(OptionError, match="'r'"):
        leanvit.adapt(small_vit(depth=2), "none", r=3)


BAD_OPTIONS = [
    ("evit", dict(keep_rate=0)),
    ("evit", dict(keep_rate=1.5)),
    ("evit", dict(keep_rate=-0.2)),
    ("evit", dict(keep_rate="most")),
    ("evit", dict(layers=(3, 12))),
    ("evit", dict(layers=(-1,))),
    ("evit", dict(layers="3-")),
    ("ppt", dict(layers=(3, 6, 12))),
    ("ppt", dict(threshold=-1e-5)),
    ("ppt", dict(threshold="high")),
    ("ppt", dict(r=-1)),
    ("ppt", dict(r=2.5)),
    ("ats", dict(layers=(12,))),
    ("ats", dict(tokens=0)),
    ("ats", dict(tokens=1.5)),
    ("ats", dict(tokens=-3)),
    ("ats", dict(tokens=True)),
    ("tome", dict(r=-1)),
    ("tome", dict(r=2.5)),
    ("tome", dict(r=[3, -1])),
    ("tome", dict(r=[1] * 13)),
    ("tome", dict(r=(13, 1.5))),
    ("random", dict(layers=(20,))),
    ("random", dict(keep_rate=0.0)),
    ("random", dict(seed=-1)),
    ("random", dict(schedule=[60] * 11)),
    ("random", dict(schedule=[60] * 13)),
    ("random", dict(schedule=[60] * 11 + [1])),  # fewer tokens than prefix + 1
]


@pytest.mark.parametrize("method, opts", BAD_OPTIONS, ids=[f"{m}-{o}" for m, o in BAD_OPTIONS])
def test_bad_option_values_raise_option_error(method, opts):
    with pytest.raises(OptionError):
        leanvit.adapt(small_vit(), method, **opts)  # depth 12, 65 tokens


def test_layers_out_of_range_message_names_layer_and_depth():
    with pytest.raises(OptionError) as e:
        leanvit.adapt(small_vit(depth=6), "evit", layers=(3, 6))
    assert "[6]" in str(e.value) and "6 blocks" in str(e.value)


def test_ppt_threshold_zero_is_valid_and_always_prunes():
    f = leanvit.adapt(small_vit(sharp=3.0), "ppt", r=8, threshold=0)
    with torch.no_grad():
        f(images(3))
    assert f.method.prune_fraction() == {3: 1.0, 6: 1.0, 9: 1.0}


# --------------------------------------------------------------------------- token counts per layer
def _counts_b1(method, size="small", **opts):
    f = leanvit.adapt(deit(size), method, **opts)
    _, trace, _ = run_traced(f, images(1, 224, seed=3), track_source=False)
    return [int(r["mlp_tokens"][0]) for r in trace], f


def test_ppt_counts_deit_s():
    counts, f = _counts_b1("ppt", r=50)
    # 197 -> 147 -> 97 -> 49: the third step is capped at floor((97 - 1) / 2) = 48
    assert counts == [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3
    assert sorted(f.method.prune_fraction()) == [3, 6, 9]


def test_tome_counts_deit_s():
    counts, _ = _counts_b1("tome", r=13)
    assert counts == [197 - 13 * (i + 1) for i in range(12)]


@pytest.mark.parametrize("fuse, expected", [
    (True, [140, 100, 72]),   # 1 + ceil(.7*196) + fused; 1 + ceil(.7*139) + fused; 1 + ceil(.7*99) + fused
    (False, [139, 98, 69]),   # 1 + ceil(.7*196); 1 + ceil(.7*138) = 1 + 97; 1 + ceil(.7*97) = 1 + 68
])
def test_evit_counts_deit_s(fuse, expected):
    counts, _ = _counts_b1("evit", keep_rate=0.7, fuse=fuse)
    assert counts == [197] * 3 + [expected[0]] * 3 + [expected[1]] * 3 + [expected[2]] * 3


def test_random_fixed_count_is_ceil_deit_s():
    counts, _ = _counts_b1("random", keep_rate=0.7, independent=False)
    assert counts == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3


def _tome_parse_r(r, inflect, depth):
    """ToMe's own parse_r (facebookresearch/ToMe, tome/utils.py)."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (depth - 1)
    return [int(min_val + step * i) for i in range(depth)]


def _expected_tome_counts(n, sched, n_prefix=1):
    out = []
    for r in sched:
        n -= min(r, (n - n_prefix) // 2)
        out.append(n)
    return out


@pytest.mark.parametrize("r, sched", [
    ((16, 0.5), [8, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24]),
    ((40, 1.0), _tome_parse_r(40, 1.0, 12)),  # grows to 80: later blocks hit the cap
    ([10, 0, 5, 20], [10, 0, 5, 20] + [0] * 8),
    ((10, 0, 5), [10, 0, 5] + [0] * 9),  # a tuple that is not (r, inflection) is a list
    (7, [7] * 12),
])
def test_tome_schedules(r, sched):
    model = small_vit(img_size=64, patch_size=4, embed_dim=32, num_heads=2)  # 257 tokens
    f = leanvit.adapt(model, "tome", r=r)
    assert f.method.schedule == sched
    assert sched == (_tome_parse_r(*r, 12) if isinstance(r, tuple) and len(r) == 2 else sched)
    _, trace, _ = run_traced(f, images(2, 64), track_source=False)
    assert [row[0] for row in mlp_counts(trace)] == _expected_tome_counts(257, sched)
    assert sorted(f.decision_layers) == [i for i, v in enumerate(sched) if v > 0]


def test_tome_r_capped_at_half_the_mergeable_tokens():
    f = leanvit.adapt(small_vit(distilled=True), "tome", r=100)
    _, trace, _ = run_traced(f, images(1), track_source=False)
    # 66 tokens, 2 prefix: 66-32=34, 34-16=18, 18-8=10, 10-4=6, 6-2=4, 4-1=3, then nothing left to merge
    assert [row[0] for row in mlp_counts(trace)] == [34, 18, 10, 6, 4, 3, 3, 3, 3, 3, 3, 3]


def test_random_schedule_counts():
    sched = [65, 60, 60, 50, 50, 50, 30, 30, 20, 20, 10, 10]
    f = leanvit.adapt(small_vit(), "random", schedule=sched)
    assert f.method.decision_layers() == (1, 3, 6, 8, 10)
    _, trace, _ = run_traced(f, images(3), track_source=False)
    assert mlp_counts(trace) == [[n] * 3 for n in sched]


def test_random_independent_is_ragged_with_expected_rate():
    f = leanvit.adapt(small_vit(), "random", keep_rate=0.5, layers=(0,))
    _, trace, state = run_traced(f, images(64), track_source=False)
    c = trace[0]["mlp_tokens"] - 1
    assert len(set(c.tolist())) > 3  # per-image counts
    assert abs(c.double().mean().item() - 32) < 2.5  # Binomial(64, .5): sd of the mean of 64 images is .5
    assert state.valid is not None


def test_ats_counts_bounded_and_per_image():
    f = leanvit.adapt(small_vit(sharp=4.0), "ats", tokens=20)
    _, trace, _ = run_traced(f, images(4), track_source=False)
    counts = torch.tensor(mlp_counts(trace))  # (depth, B)
    assert bool((counts[:3] == 65).all())
    assert bool((counts[3:] - 1 <= 20).all())  # at most K patches
    assert bool((counts[3:] >= 2).all())
    assert bool((counts[1:] <= counts[:-1]).all())  # never grows
    assert bool((counts[3:] < 21).any())  # duplicates collapsed somewhere
    assert any(len(set(row.tolist())) > 1 for row in counts[3:])  # per-image counts differ


def test_ats_fraction_keeps_at_most_k():
    f = leanvit.adapt(small_vit(sharp=4.0), "ats", tokens=0.5, layers=(3,))
    _, trace, _ = run_traced(f, images(4), track_source=False)
    assert bool((trace[3]["mlp_tokens"] - 1 <= 32).all())


# --------------------------------------------------------------------------- hand-made ToMe merges
def _unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def _metric7():
    """7 tokens; A = 0,2,4,6, B = 1,3,5. Best matches: 2->5 (1.0), 4->1 (.99), 6->3 (.8);
    token 0 is identical to token 1 but is the CLS token and must never merge."""
    return torch.stack([
        _unit(1, 0, 0, 0), _unit(1, 0, 0, 0), _unit(0, 0, 1, 0), _unit(0, 0, 0, 1),
        _unit(.99, .14, 0, 0), _unit(0, 0, 1, 0), _unit(0, .6, 0, .8),
    ])[None]


def _state7(n_prefix, with_size=True):
    x = torch.arange(7 * 3, dtype=torch.float32).reshape(1, 7, 3) ** 1.5
    size = torch.tensor([[1., 1., 2., 1., 3., 1., 1.]]) if with_size else None
    return TokenState(x=x, n_prefix=n_prefix, size=size, source=torch.eye(7)[None])


def test_merge_tokens_hand_made_cls():
    s = _state7(1)
    x = s.x[0]
    out = merge_tokens(s, _metric7(), r=2)
    # prefix, unmerged A (index order: 6), then B (1, 3, 5) with 4 merged into 1 and 2 into 5
    assert out.n_tokens == 5
    assert torch.equal(out.size[0], torch.tensor([1., 1., 4., 1., 3.]))
    expected = torch.stack([x[0], x[6], (1 * x[1] + 3 * x[4]) / 4, x[3], (1 * x[5] + 2 * x[2]) / 3])
    assert torch.allclose(out.x[0], expected, rtol=1e-6)
    src = out.source[0]
    assert src.nonzero().tolist() == [[0, 0], [1, 6], [2, 1], [2, 4], [3, 3], [4, 2], [4, 5]]


def test_merge_tokens_hand_made_distilled_prefix_protected():
    s = _state7(2)
    x = s.x[0]
    out = merge_tokens(s, _metric7(), r=2)
    # token 1 (distillation) cannot absorb token 4; the best remaining pairs are 2->5 and 6->3
    expected = torch.stack([x[0], x[1], x[4], (x[3] + x[6]) / 2, (x[5] + 2 * x[2]) / 3])
    assert torch.allclose(out.x[0], expected, rtol=1e-6)
    assert torch.equal(out.size[0], torch.tensor([1., 1., 3., 2., 3.]))
    assert torch.equal(out.source[0, :2], torch.eye(7)[:2])


def test_merge_tokens_max_r_never_merges_prefix():
    s = _state7(1, with_size=False)
    r = max_merge(7, 1)
    assert r == 3
    out = merge_tokens(s, _metric7(), r=r)
    assert out.n_tokens == 4
    assert torch.equal(out.x[0, 0], s.x[0, 0])  # CLS untouched although identical in metric to token 1
    assert torch.equal(out.size[0], torch.tensor([1., 2., 2., 2.]))
    assert torch.equal(out.source.sum(1), torch.ones(1, 7))


def test_merge_two_sources_into_one_destination():
    metric = torch.stack([_unit(1, 0), _unit(1, 0), _unit(0, 1), _unit(.1, 1), _unit(-.1, 1)])[None]
    x = torch.tensor([[[0.], [10.], [1.], [2.], [4.]]])
    s = TokenState(x=x, n_prefix=1, size=torch.tensor([[1., 1., 2., 3., 5.]]))
    out = merge_tokens(s, metric, r=2)  # A = 0, 2, 4; B = 1, 3: both 2 and 4 go into 3
    assert torch.equal(out.size, torch.tensor([[1., 1., 10.]]))
    assert torch.allclose(out.x, torch.tensor([[[0.], [10.], [(2 * 1 + 3 * 2 + 5 * 4) / 10]]]))


def test_merge_r_zero_is_identity():
    s = _state7(1)
    assert merge_tokens(s, _metric7(), 0) is s


def test_merge_on_ragged_batch_refused():
    s = _state7(1).replace(valid=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError):
        merge_tokens(s, _metric7(), 1)


def _tome_reference(metric, x, size, r, distill):
    """facebookresearch/ToMe bipartite_soft_matching + merge_wavg (class_token=True)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    if distill:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        if distill:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    xs = merge(x * size[..., None])
    s = merge(size[..., None])
    return xs / s, s[..., 0]


@pytest.mark.parametrize("n, distill", [(17, False), (18, False), (17, True), (18, True)])
@pytest.mark.parametrize("r", [1, 5, 7])
def test_merge_tokens_matches_tome_reference(n, distill, r):
    g = torch.Generator().manual_seed(n * 10 + r)
    metric = torch.randn(3, n, 8, generator=g)
    x = torch.randn(3, n, 5, generator=g)
    size = torch.randint(1, 4, (3, n), generator=g).float()
    p = 2 if distill else 1
    r = min(r, max_merge(n, p))
    out = merge_tokens(TokenState(x=x, n_prefix=p, size=size), metric, r)
    rx, rs = _tome_reference(metric, x, size, r, distill)
    assert torch.allclose(out.x, rx, atol=1e-6)
    assert torch.equal(out.size, rs)


def test_bipartite_soft_matching_many_prefix_tokens_stay_in_order():
    g = torch.Generator().manual_seed(0)
    n, p = 15, 5  # CLS + 4 registers
    metric = torch.randn(2, n, 6, generator=g)
    metric[:, :p] = metric[:, p:p + 1]  # prefix tokens look exactly like patch 5: tempting merges
    merge = bipartite_soft_matching(metric, max_merge(n, p), n_prefix=p)
    ids = torch.arange(n, dtype=torch.float32)[None, :, None].expand(2, n, 1)
    out = merge(ids)  # prefix tokens absorb nothing, so their sums are their own ids
    assert out.shape[1] == n - max_merge(n, p)
    assert out[:, :p, 0].tolist() == [list(range(p))] * 2
    cnt = merge(torch.ones(2, n, 1))
    assert torch.equal(cnt[:, :p], torch.ones(2, p, 1))
    assert cnt.sum().item() == 2 * n


# --------------------------------------------------------------------------- hand-made pruning / fusion
def test_keep_top_hand_made():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    s = TokenState(x=x, n_prefix=1, size=torch.tensor([[1., 2., 3., 4., 5., 6.]]), source=torch.eye(6)[None])
    out = keep_top(s, torch.tensor([[0.1, 0.5, 0.3, 0.05, 0.4]]), 3)
    assert out.x[0, :, 0].tolist() == [0, 2, 5, 3]  # CLS, then by descending score
    assert out.size[0].tolist() == [1, 3, 6, 4]
    assert out.source[0].argmax(-1).tolist() == [0, 2, 5, 3]
    assert out.valid is None


def test_keep_top_never_keeps_padding():
    x = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1)
    valid = torch.tensor([[True, True, True, True, False]])
    s = TokenState(x=x, n_prefix=1, valid=valid)
    out = keep_top(s, torch.tensor([[0.1, 0.2, 0.3, 9.0]]), 2)
    assert out.x[0, :, 0].tolist() == [0, 3, 2]


def test_keep_mask_hand_made_ragged():
    x = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)
    s = TokenState(x=x, n_prefix=1, size=torch.arange(1, 13, dtype=torch.float32).reshape(2, 6))
    keep = torch.tensor([[True, False, True, False, True], [False, True, False, False, False]])
    out = keep_mask(s, keep)
    assert out.n_tokens == 4
    assert out.valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert out.x[0, :, 0].tolist() == [0, 1, 3, 5]  # kept tokens stay in their order
    assert out.x[1, :2, 0].tolist() == [6, 8]
    assert out.size[0].tolist() == [1, 2, 4, 6] and out.size[1, :2].tolist() == [7, 9]
    assert out.counts().tolist() == [4, 2]
    # padding of the input never survives, and a full batch drops the mask
    out2 = keep_mask(out, torch.ones(2, 3, dtype=torch.bool))
    assert out2.counts().tolist() == [4, 2]
    out3 = keep_mask(s, torch.tensor([[True, True, False, False, False]] * 2))
    assert out3.valid is None and out3.x[:, :, 0].tolist() == [[0, 1, 2], [6, 7, 8]]


def test_ragged_attention_bias():
    s = TokenState(x=torch.zeros(1, 3, 2), n_prefix=1, size=torch.tensor([[1., 2., 4.]]),
                   valid=torch.tensor([[True, True, False]]))
    b = s.attn_bias()
    assert b.shape == (1, 1, 1, 3)
    assert torch.allclose(b[0, 0, 0, :2], torch.tensor([0.0, math.log(2.0)]))
    assert b[0, 0, 0, 2].item() == float("-inf")


def test_fuse_rest_hand_made_not_renormalised():
    x = torch.tensor([[[100.], [1.], [2.], [3.], [4.]]])
    src = torch.eye(5)[None]
    s = TokenState(x=x, n_prefix=1, source=src)
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    out = fuse_rest(s, scores, 2)
    # kept: tokens 1 (.4) and 3 (.3); fused: .1 * x2 + .2 * x4 = .2 + .8 (weights sum to .3, kept so)
    assert out.x[0, :, 0].tolist() == pytest.approx([100., 1., 3., 0.1 * 2 + 0.2 * 4])
    assert out.size is None
    assert out.source[0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 0, 1]]
    sized = fuse_rest(s.replace(size=torch.tensor([[1., 2., 3., 4., 5.]])), scores, 2)
    assert sized.size[0].tolist() == [1., 2., 4., 1.]  # the fused token counts as an ordinary token
    with pytest.raises(ValueError):
        fuse_rest(s.replace(valid=torch.ones(1, 5, dtype=torch.bool)), scores, 2)


def test_choose_takes_each_image_from_its_branch():
    a = TokenState(x=torch.full((3, 3, 1), 1.0), n_prefix=1, size=None)
    b = TokenState(x=torch.full((3, 3, 1), 2.0), n_prefix=1, size=torch.tensor([[1., 2., 3.]] * 3))
    out = choose(torch.tensor([True, False, True]), a, b)
    assert out.x[:, 0, 0].tolist() == [1., 2., 1.]
    assert out.size.tolist() == [[1, 1, 1], [1, 2, 3], [1, 1, 1]]
    with pytest.raises(ValueError, match="same token count"):
        choose(torch.tensor([True]), a, TokenState(x=torch.zeros(3, 2, 1), n_prefix=1))


def test_keep_first_per_image_counts_after_sorting_by_score():
    x = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    s = TokenState(x=x, n_prefix=1, source=torch.eye(5).expand(2, 5, 5))
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.05], [0.4, 0.3, 0.2, 0.1]])
    ordered, sc = sort_by_score(s, scores)
    assert ordered.x[:, :, 0].tolist() == [[0, 2, 3, 1, 4], [5, 6, 7, 8, 9]]
    assert sc[0].tolist() == pytest.approx([0.5, 0.3, 0.1, 0.05])
    out = keep_first(ordered, torch.tensor([2, 3]))
    assert out.x.shape == (2, 4, 1) and out.counts().tolist() == [3, 4]
    assert out.valid.tolist() == [[True, True, True, False], [True] * 4]
    assert out.source[0, :3].argmax(-1).tolist() == [0, 2, 3]
    assert keep_first(ordered, torch.tensor([2, 2])).valid is None  # equal counts: no padding
    # padding never sorts before a real token
    ragged = TokenState(x=x, n_prefix=1, valid=torch.tensor([[True] * 5, [True, True, False, False, False]]))
    assert sort_by_score(ragged, torch.tensor([[0.] * 4, [0.1, 9., 9., 9.]]))[0].x[1, :2, 0].tolist() == [5, 6]


def test_merge_into_first_per_image_equals_each_image_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    valid = torch.arange(7)[None] < torch.tensor([7, 5, 6])[:, None]
    s = TokenState(x=x * valid[..., None], n_prefix=1, valid=valid, source=torch.eye(7).expand(3, 7, 7) * valid[..., None])
    k = torch.tensor([3, 2, 1])
    out = merge_into_first(s, k)
    assert out.counts().tolist() == [4, 3, 2]
    assert out.size.sum(1).tolist() == [7, 5, 6]  # every real token lands in one destination
    for i in range(3):
        n = int(valid[i].sum())
        alone = merge_into_first(TokenState(x=x[i:i + 1, :n], n_prefix=1, source=torch.eye(7)[None, :n]), k[i:i + 1])
        m = int(out.counts()[i])
        torch.testing.assert_close(out.x[i, :m], alone.x[0])
        assert torch.equal(out.size[i, :m], alone.size[0]) and torch.equal(out.source[i, :m], alone.source[0])


# --------------------------------------------------------------------------- decisions vs independent computation
def _block_input(model, x, layer):
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for blk in model.blocks[:layer]:
            h = blk(h)
    return h


def _attention(model, x, layer):
    """(attn probs (B,H,N,N), values (B,H,N,hd)) of block ``layer`` computed by hand."""
    blk = model.blocks[layer]
    h = blk.norm1(_block_input(model, x, layer))
    B, N, C = h.shape
    a = blk.attn
    with torch.no_grad():
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        probs = ((q * a.head_dim ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    return probs, v


def _spec_significance(model, x, layer, n_prefix=1):
    probs, v = _attention(model, x, layer)
    s = probs[:, :, 0, n_prefix:].sum(1) * v.transpose(1, 2).flatten(2).norm(dim=-1)[:, n_prefix:]
    return s / s.sum(1, keepdim=True)


def test_evit_keeps_top_cls_attention_patches():
    model = small_vit(sharp=3.0)
    x = images(3)
    f = leanvit.adapt(model, "evit", keep_rate=0.7, layers=(3,), fuse=False)
    _, _, state = run_traced(f, x)
    probs, _ = _attention(model, x, 3)
    score = probs[:, :, 0, 1:].mean(1)  # CLS attention averaged over heads
    k = math.ceil(0.7 * 64)
    kept = state.source.argmax(-1)[:, 1:] - 1  # input patch of every surviving token, in order
    assert kept.shape == (3, k)
    for i in range(3):
        assert set(kept[i].tolist()) == set(score[i].topk(k).indices.tolist())
        s = score[i, kept[i]]
        assert bool((s[:-1] >= s[1:] - 1e-7).all())  # ordered by descending score


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_never_drops_distillation_token(fuse):
    model = small_vit(sharp=3.0, distilled=True)
    f = leanvit.adapt(model, "evit", keep_rate=0.2, fuse=fuse, layers=(1, 2, 3, 4, 5, 6))
    _, trace, state = run_traced(f, images(3))
    n = 64
    expected = []
    for _ in range(6):
        n = math.ceil(0.2 * n) + (1 if fuse else 0)
        expected.append(n + 2)
    assert [row[0] for row in mlp_counts(trace)[1:7]] == expected
    assert torch.equal(state.source[:, :2], torch.eye(66)[:2].expand(3, -1, -1))


def test_ppt_significance_matches_spec_and_decides_policy():
    model = small_vit(sharp=3.0)
    x = images(6, seed=5)
    meth = leanvit.build_method("ppt", r=8, layers=(3,), threshold=1e9)
    seen = {}
    orig = meth.reduce

    def spy(layer, state, attn):
        seen["sig"] = attn.significance.clone()
        return orig(layer, state, attn)

    meth.reduce = spy
    run_traced(leanvit.adapt(model, meth), x)
    sig = _spec_significance(model, x, 3)
    assert torch.allclose(seen["sig"], sig, atol=1e-6)
    assert torch.allclose(sig.sum(1), torch.ones(6))
    var = sig.var(1, unbiased=True)
    v = var.sort().values
    thr = float((v[2] * v[3]).sqrt())  # between two images' variances: 3 prune, 3 pool
    f = leanvit.adapt(model, "ppt", r=8, layers=(3,), threshold=thr)
    _, _, state = run_traced(f, x)
    cov = state.source.sum(1)
    pruned = (cov == 0).any(1)  # pruned images lost r input tokens; pooled ones cover all of them
    assert pruned.tolist() == (var >= thr).tolist()
    assert int(pruned.sum()) == 3


def test_ppt_prune_keeps_top_significance_in_descending_order():
    model = small_vit(sharp=3.0)
    x = images(2)
    f = leanvit.adapt(model, "ppt", r=8, layers=(3,), threshold=1e-30)
    _, _, state = run_traced(f, x)
    sig = _spec_significance(model, x, 3)
    kept = state.source.argmax(-1)[:, 1:] - 1
    for i in range(2):
        assert set(kept[i].tolist()) == set(sig[i].topk(56).indices.tolist())
        s = sig[i, kept[i]]
        assert bool((s[:-1] >= s[1:] - 1e-7).all())


def test_ppt_threshold_extremes():
    model = small_vit(sharp=3.0)
    x = images(4)
    prune = leanvit.adapt(model, "ppt", r=8, threshold=1e-30)
    pool = leanvit.adapt(model, "ppt", r=8, threshold=1e9)
    with torch.no_grad():
        prune(x)
        pool(x)
    assert prune.method.prune_fraction() == {3: 1.0, 6: 1.0, 9: 1.0}
    assert pool.method.prune_fraction() == {3: 0.0, 6: 0.0, 9: 0.0}
    assert prune.method.seen_counts == {3: 4, 6: 4, 9: 4}
    pool.method.reset_stats()
    assert pool.method.prune_fraction() == {}


def test_methods_answer_stats_and_extra_loss():
    """Callers ask every method the same (no probing): neutral answers unless a method has more."""
    model, x = small_vit(sharp=3.0), images(4)
    for name in METHODS:
        f = leanvit.adapt(model, name)
        with torch.no_grad():
            f(x)
        assert f.method.extra_loss() is None
        assert f.method.stats() == ({"prune_fraction_per_layer": f.method.prune_fraction()} if name == "ppt" else {})
        f.method.reset_stats()
        assert f.method.stats() == ({"prune_fraction_per_layer": {}} if name == "ppt" else {})


def test_ppt_scaled_threshold():
    f = leanvit.adapt(small_vit(), "ppt", threshold="scaled")
    assert f.method.threshold == pytest.approx(7e-5 * (196 / 64) ** 2, rel=1e-12)
    assert f.method.threshold == pytest.approx(6.5649e-4, rel=1e-4)
    assert leanvit.adapt(deit("tiny"), "ppt", threshold="scaled").method.threshold == pytest.approx(7e-5)
    assert leanvit.adapt(small_vit(), "ppt").method.threshold == 7e-5


def test_tome_uses_key_mean_metric_on_real_model():
    """One ToMe step inside the runtime equals the reference merge on the block's own keys."""
    model = small_vit(sharp=3.0)
    x = images(2)
    f = leanvit.adapt(model, "tome", r=[0, 0, 0, 9])
    _, _, state = run_traced(f, x)
    blk = model.blocks[3]
    h = blk.norm1(_block_input(model, x, 3))
    with torch.no_grad():
        B, N, C = h.shape
        a = blk.attn
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        ref_src, _ = _tome_reference(k.mean(1), torch.eye(N).expand(B, N, N), torch.ones(B, N), 9, False)
    assert torch.equal(state.source, (ref_src > 0).float())


def test_merge_into_first_hand_made():
    # CLS + 4 patches; scores pick patches 0 and 2 as destinations; patch 1 looks like patch 2,
    # patch 3 like patch 0
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [2.0, 0.1]]])
    s = TokenState(x=x, n_prefix=1, size=torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]]),
                   source=torch.eye(5)[None])
    out = merge_into_first(sort_by_score(s, torch.tensor([[0.9, 0.1, 0.5, 0.2]]))[0], torch.tensor([2]))
    assert out.x.shape == (1, 3, 2)
    torch.testing.assert_close(out.x[0, 0], x[0, 0])  # CLS untouched
    # destination patch 0 (score .9) absorbs patch 3 ([2, .1]); destination patch 2 (score .5, size 1)
    # absorbs patch 1 ([0, 2], size 3)
    torch.testing.assert_close(out.x[0, 1], (x[0, 1] + x[0, 4]) / 2)
    torch.testing.assert_close(out.x[0, 2], (x[0, 3] * 1 + x[0, 2] * 3) / 4)
    assert out.size.tolist() == [[1.0, 2.0, 4.0]]
    assert out.source[0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 1, 0]]


def test_ats_with_one_patch_left_everywhere_decides_nothing_more():
    """ATS at half the tokens per layer halves 64 patches to one by block 8; its later decision
    layers (which skip their sampling then) change nothing: the same logits and counts as ATS on
    blocks 3-8 alone."""
    model, x = small_vit(sharp=4.0), images(6)
    out, trace, _ = run_traced(leanvit.adapt(model, "ats", tokens=0.5), x)
    ref, ref_trace, _ = run_traced(leanvit.adapt(model, "ats", tokens=0.5, layers=tuple(range(3, 9))), x)
    assert mlp_counts(trace)[8:] == [[2] * 6] * 4 and mlp_counts(trace) == mlp_counts(ref_trace)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
