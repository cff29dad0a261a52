"""Vision encoders: token outputs (forward_tokens / unmerge), scoring without a CLS
token, attention-pool (MAP) heads, and coverage over timm's encoder families."""
from __future__ import annotations

import pytest
import torch

import leanvit

from conftest import AboveMean, images, sharpen, small_vit


# --------------------------------------------------------------------------- token outputs
@pytest.mark.parametrize("overrides", [
    dict(), dict(distilled=True), dict(reg_tokens=4), dict(class_token=False, global_pool="avg"),
], ids=["cls", "distilled", "registers", "gap_no_cls"])
def test_forward_tokens_none_equals_forward_features(overrides):
    model = sharpen(small_vit(depth=4, **overrides), 2.0)
    x = images(3)
    f = leanvit.adapt(model, "none")
    with torch.no_grad():
        out = f.forward_tokens(x, source=True)
        ref = model.forward_features(x)
    assert out.tokens.shape == ref.shape
    assert (out.tokens - ref).abs().max().item() <= 1e-6
    assert out.valid is None and torch.equal(out.sizes, torch.ones(ref.shape[:2]))
    assert torch.equal(out.source, torch.eye(ref.shape[1]).expand(3, -1, -1))
    assert torch.equal(f.unmerge(out), out.tokens)
    assert f.track_source is False  # asking for sources does not leave tracking on


def test_forward_tokens_merged_unmerge_spreads_each_token_over_its_patches():
    model = small_vit(depth=6, sharp=3.0, reg_tokens=2)
    f = leanvit.adapt(model, "tome", r=6)
    x = images(2)
    with torch.no_grad():
        out = f.forward_tokens(x, source=True)
        logits = f(x)
    n0 = 64 + 3
    assert out.tokens.shape == (2, n0 - 6 * 6, 64) and out.valid is None
    # sizes are what the sources say, and every input token is covered by exactly one token
    assert torch.equal(out.sizes, out.source.sum(-1))
    assert torch.equal(out.source.sum(1), torch.ones(2, n0))
    full = f.unmerge(out)
    assert full.shape == (2, n0, 64)
    owner = out.source.argmax(1)  # (B, N0) the token each input token belongs to
    assert torch.equal(full, torch.stack([out.tokens[b, owner[b]] for b in range(2)]))
    assert torch.equal(full[:, :3], out.tokens[:, :3])  # prefix first, standing for itself
    # a projector's output spreads the same way
    proj = torch.nn.Linear(64, 5)
    with torch.no_grad():
        assert torch.allclose(f.unmerge(out, proj(out.tokens)), proj(full), atol=1e-6)
    # the tokens are what the head classifies
    with torch.no_grad():
        assert torch.allclose(model.forward_head(out.tokens), logits, atol=1e-6)


def test_forward_tokens_ragged_batch_masks_padding_and_zeroes_pruned_patches():
    f = leanvit.adapt(small_vit(depth=6, sharp=4.0), AboveMean((2, 4)))
    x = images(4)
    with torch.no_grad():
        out = f.forward_tokens(x, source=True)
    assert out.valid is not None and not bool(out.valid.all())
    assert bool((out.tokens[~out.valid] == 0).all()) and bool((out.source[~out.valid] == 0).all())
    full = f.unmerge(out)
    covered = out.source.sum(1) > 0  # (B, N0)
    assert bool((full[~covered] == 0).all())
    assert torch.equal(covered.sum(1), out.valid.sum(1))  # pruning: one patch per real token
    for b in range(4):  # each image alone gives its own real tokens
        with torch.no_grad():
            alone = f.forward_tokens(x[b:b + 1])
        n = int(out.valid[b].sum())
        assert alone.tokens.shape[1] == n
        assert torch.allclose(alone.tokens[0], out.tokens[b, :n], atol=1e-5)


def test_unmerge_needs_sources_and_matching_features():
    f = leanvit.adapt(small_vit(depth=2), "none")
    with torch.no_grad():
        out = f.forward_tokens(images(2))
    assert out.source is None
    with pytest.raises(ValueError, match="source=True"):
        f.unmerge(out)
    with torch.no_grad():
        out = f.forward_tokens(images(2), source=True)
    with pytest.raises(ValueError, match="tokens"):
        f.unmerge(out, torch.zeros(2, 3, 8))


def test_forward_tokens_empty_batch():
    f = leanvit.adapt(small_vit(depth=2), "tome", r=2)
    with torch.no_grad():
        out = f.forward_tokens(torch.zeros(0, 3, 32, 32), source=True)
    assert out.tokens.shape == (0, 65, 64) and out.source.shape == (0, 65, 65)


# --------------------------------------------------------------------------- scoring without CLS
def test_cls_substitute_is_mean_attention_received_weighted_by_size():
    """Without a CLS token, the score is the attention each key receives, averaged over the real
    queries weighted by their sizes; padding neither receives nor gives."""
    from leanvit.methods.base import AttentionView
    g = torch.Generator().manual_seed(0)
    B, H, N, d = 2, 3, 6, 4
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0], [1.0, 1.0, 4.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    bias = size.log().masked_fill(~valid, float("-inf"))[:, None, None, :]
    view = AttentionView(q, k, v, bias, n_prefix=0)
    view.has_cls = False
    noted = []
    view.note_macs = lambda macs, padded: noted.append((macs, padded))
    expected = torch.zeros(B, H, N)
    for b in range(B):
        n = int(valid[b].sum())
        for h in range(H):
            a = ((q[b, h, :n] @ k[b, h, :n].T) / d ** 0.5 + size[b, :n].log()).softmax(-1)  # (n, n)
            expected[b, h, :n] = (size[b, :n, None] * a).sum(0) / size[b, :n].sum()
    torch.testing.assert_close(view.cls_attn, expected)
    torch.testing.assert_close(view.cls_attn_mean, expected.mean(1))
    torch.testing.assert_close(view.cls_attn.sum(-1), torch.ones(B, H))
    assert noted[0][0].tolist() == [6 * 6 * d * H, 4 * 4 * d * H] and noted[0][1] == N * N * d * H
    with_cls = AttentionView(q, k, v, bias, n_prefix=0)  # the default: token 0 is a CLS token
    assert not torch.allclose(with_cls.cls_attn, view.cls_attn)


NO_CLS = {
    "gap": lambda: small_vit(depth=6, sharp=3.0, class_token=False, global_pool="avg"),
    "reg4_gap": lambda: small_vit(depth=6, sharp=3.0, class_token=False, reg_tokens=4, global_pool="avg",
                                  no_embed_class=True),
}
NO_CLS_METHODS = [
    ("evit", dict(keep_rate=0.5, layers=(1, 3), fuse=True)),
    ("evit", dict(keep_rate=0.5, layers=(1, 3), fuse=False)),
    ("ppt", dict(r=10, layers=(1, 3), threshold=1e9)),  # pool
    ("ppt", dict(r=10, layers=(1, 3), threshold=0)),  # prune
    ("ats", dict(layers=(2, 4))),
    ("prance", dict(strategy="prune-merge", stages=3)),
]


@pytest.mark.parametrize("family", list(NO_CLS))
@pytest.mark.parametrize("method, opts", NO_CLS_METHODS, ids=[f"{m}-{o}" for m, o in NO_CLS_METHODS])
def test_cls_scoring_methods_run_without_cls_token(family, method, opts):
    from test_flops import measured_macs
    model = NO_CLS[family]()
    p = model.num_prefix_tokens
    f = leanvit.adapt(model, method, **opts)
    x = images(3)
    with torch.no_grad(), f.tracing() as trace:
        logits = f(x)
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())
    counts = f.last_state.counts()
    assert bool((counts < 64 + p).all())  # really reduced
    if method == "evit" and opts["fuse"]:
        assert counts.tolist() == [p + 17 + 1] * 3  # 64 -> 32 + fused -> ceil(33 / 2) + fused
    if method == "ppt":
        assert f.method.prune_fraction() == {1: float(opts["threshold"] == 0), 3: float(opts["threshold"] == 0)}
    # the substitute's attention map is counted: analytic == measured
    substitute = [rec for rec in trace if rec["layer"] is None]
    assert substitute
    analytic = leanvit.count_macs(f, x, padded=method in ("ats", "prance")) * 1e9
    measured = measured_macs(f, x)
    assert measured == pytest.approx(analytic, rel=0.01) and analytic <= measured * (1 + 1e-12)
    if method == "evit":  # nothing else to count (PPT: the merge similarities; ATS, PRANCE: padding): exact
        assert measured == pytest.approx(analytic, rel=1e-9)


def test_substitute_features_without_cls_token_are_the_mean_real_token():
    """PRANCE's selector and RL4EViT's critic read the CLS token; without one, the mean real token."""
    from leanvit.tokens import TokenState
    x = torch.randn(2, 5, 3)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    s = TokenState(x=x, n_prefix=1, valid=valid)
    assert torch.equal(s.summary(True), x[:, 0])
    torch.testing.assert_close(s.summary(False), torch.stack([x[0].mean(0), x[1, :3].mean(0)]))
    f = leanvit.adapt(NO_CLS["reg4_gap"](), "prance", strategy="prune", stages=3)
    state = TokenState(x=torch.randn(2, 68, 64), n_prefix=4)
    assert torch.equal(f.method.features(state, 1)[:, :64], state.x.mean(1))


# --------------------------------------------------------------------------- MAP heads
MAP = {
    "map": lambda: small_vit(depth=4, sharp=3.0, class_token=False, global_pool="map"),
    "map_reg4": lambda: small_vit(depth=4, sharp=3.0, class_token=False, reg_tokens=4, global_pool="map",
                                  no_embed_class=True),
    "map_cls": lambda: small_vit(depth=4, sharp=3.0, global_pool="map"),
}


def _random_pool(model):
    """The latent starts tiny; make the pool's attention matter."""
    with torch.no_grad():
        model.attn_pool.latent.normal_(0.0, 1.0)
        model.attn_pool.kv.weight.mul_(3.0)
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("family", list(MAP))
def test_map_head_none_matches_timm(family, mode):
    from test_flops import measured_macs
    model = _random_pool(MAP[family]()).train(mode == "train")
    f = leanvit.adapt(model, "none")
    x = images(3)
    with torch.no_grad():
        assert (f(x) - model(x)).abs().max().item() <= 1e-5
    model.eval()
    assert measured_macs(f, x) == pytest.approx(leanvit.count_macs(f, x) * 1e9, rel=1e-9)


def test_map_head_attends_with_log_size_bias_and_padding_mask():
    """The pool sees merged tokens as the blocks do: a token of size s weighs as s copies of it.
    So duplicating tokens and merging the duplicates back gives the same pooled output."""
    from leanvit.runtime import attention_pool
    pool = _random_pool(MAP["map"]()).attn_pool
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    dup = torch.cat([x, x[:, 1:2], x[:, 1:2], x[:, 3:4]], dim=1)  # token 1 three times, token 3 twice
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0]] * 2)
    with torch.no_grad():
        ref = attention_pool(pool, dup, None)
        out = attention_pool(pool, x, size.log()[:, None, None, :])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # padding is ignored: one image padded with junk equals it alone
        pad = torch.cat([x, torch.randn(2, 3, 64, generator=g) * 100], dim=1)
        mask = torch.zeros(2, 8).masked_fill(torch.arange(8) >= 5, float("-inf"))[:, None, None, :]
        torch.testing.assert_close(attention_pool(pool, pad, mask), attention_pool(pool, x, None), atol=1e-5, rtol=1e-5)
        w = attention_pool(pool, x, size.log()[:, None, None, :], weights_only=True)
        wd = attention_pool(pool, dup, None, weights_only=True)
    torch.testing.assert_close(w[:, 1], wd[:, 1] * 3)  # the pooled query's weight of a merged token
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


@pytest.mark.parametrize("family", list(MAP))
@pytest.mark.parametrize("method, opts", [("tome", dict(r=6)), ("evit", dict(keep_rate=0.5, layers=(1, 2))),
                                          ("ppt", dict(r=10, layers=(1, 2), threshold=0)),
                                          ("ats", dict(tokens=0.5, layers=(1, 2))), ("random", dict(layers=(1,)))])
def test_map_head_reduced_runs_counts_and_ragged_equals_alone(family, method, opts):
    from test_flops import measured_macs
    model = _random_pool(MAP[family]())
    f = leanvit.adapt(model, method, **opts)
    x = images(4)
    if method == "random":
        f.method.generator.manual_seed(0)
    with torch.no_grad():
        logits = f(x)
    assert bool(torch.isfinite(logits).all())
    dense = leanvit.count_macs(model, x)
    if method == "random":
        f.method.generator.manual_seed(0)
    analytic = leanvit.count_macs(f, x, padded=True)
    assert analytic < dense
    if method == "random":
        f.method.generator.manual_seed(0)
    measured = measured_macs(f, x)
    assert measured == pytest.approx(analytic * 1e9, rel=0.01) and analytic * 1e9 <= measured * (1 + 1e-12)


# --------------------------------------------------------------------------- coverage of timm's families
SHRINK = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4, num_classes=10)
FAMILIES = {  # id -> timm name (random weights, shrunk by SHRINK)
    "deit": "deit_tiny_patch16_224",
    "dinov2_reg4": "vit_small_patch14_reg4_dinov2",
    "clip": "vit_base_patch16_clip_224",
    "clip_quickgelu": "vit_base_patch16_clip_quickgelu_224",
    "siglip_map": "vit_base_patch16_siglip_224",
    "siglip_gap": "vit_base_patch16_siglip_gap_224",
    "reg4_gap": "vit_base_patch16_reg4_gap_256",
    "so150m_reg4_map": "vit_so150m_patch16_reg4_map_256",
    "eva02_tiny": "eva02_tiny_patch14_224",  # timm's Eva: RoPE, SwiGLU, no k bias
    "rope_vit": "vit_base_patch16_rope_224",  # Eva with AttentionRope, layer scale
    "pe_core_map": "vit_pe_core_tiny_patch16_384",  # Eva with RoPE, a pre-norm and a MAP head over all tokens
}
REFUSED = {  # id -> (timm name, the part the error names)
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", "mixed rotary embeddings"),
    "beit": ("beit_base_patch16_224", "relative position biases"),
    "sam": ("samvit_base_patch16", "windowed attention"),
    "parallel_blocks": ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
}
COVERAGE_METHODS = [
    ("tome", dict(r=6)),
    ("evit", dict(keep_rate=0.5, layers=(1, 2))),
    ("ppt", dict(r=10, layers=(1, 2), threshold="scaled")),
    ("random", dict(keep_rate=0.5, layers=(1,), independent=False)),
]


def family(name: str):
    import timm
    model = timm.create_model(FAMILIES[name], pretrained=False, **SHRINK).eval()
    sharpen(model, 3.0)
    with torch.no_grad():
        for blk in model.blocks:  # DINOv2's LayerScale starts at 1e-5 (blocks ~identity): let it matter
            for gamma in (getattr(blk, "ls1", None), getattr(blk, "ls2", None), getattr(blk, "gamma_1", None),
                          getattr(blk, "gamma_2", None)):
                gamma = getattr(gamma, "gamma", gamma)
                if isinstance(gamma, torch.Tensor):
                    gamma.normal_(0.0, 1.0)
    if model.attn_pool is not None:
        _random_pool(model)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_dense_exact(name):
    from test_flops import measured_macs
    model = family(name)
    f = leanvit.adapt(model, "none")
    x = images(3)
    with torch.no_grad():
        assert (f(x) - model(x)).abs().max().item() <= 1e-5
        assert (f.forward_tokens(x).tokens - model.forward_features(x)).abs().max().item() <= 1e-5
    assert measured_macs(f, x) == pytest.approx(leanvit.count_macs(f, x) * 1e9, rel=1e-9)


@pytest.mark.parametrize("method, opts", COVERAGE_METHODS, ids=[m for m, _ in COVERAGE_METHODS])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_reducible(name, method, opts):
    from test_flops import measured_macs
    model = family(name)
    f = leanvit.adapt(model, method, **opts)
    x = images(3)

    def seeded(run):
        if method == "random":
            f.method.generator.manual_seed(0)
        return run()
    with torch.no_grad():
        logits = seeded(lambda: f(x))
        out = seeded(lambda: f.forward_tokens(x, source=True))
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())
    assert out.tokens.shape[1] < 64 + model.num_prefix_tokens
    assert f.unmerge(out).shape == (3, 64 + model.num_prefix_tokens, 64)
    analytic = seeded(lambda: leanvit.count_macs(f, x)) * 1e9
    assert analytic < leanvit.count_macs(model, x) * 1e9  # saves MACs, its scoring included
    measured = seeded(lambda: measured_macs(f, x))
    assert measured == pytest.approx(analytic, rel=0.01) and analytic <= measured * (1 + 1e-12)


@pytest.mark.parametrize("name", list(REFUSED))
def test_family_refused_naming_the_part(name):
    import timm
    timm_name, part = REFUSED[name]
    model = timm.create_model(timm_name, pretrained=False, **SHRINK)
    with pytest.raises(leanvit.UnsupportedModelError, match=part):
        leanvit.adapt(model, "tome")



# --------------------------------------------------------------------------- EVA / RoPE: positions travel with tokens
def test_rope_rows_travel_with_their_tokens():
    """Every token carries the rotary row of the patch it stands at: a pruned-to token its own
    patch's, a merged token its destination's (one of its sources); prefix and EViT's fused token
    the identity rotation."""
    from leanvit.tokens import identity_rope
    model = family("eva02_tiny")
    x = images(2)
    m = model
    table = m._pos_embed(m.patch_embed(x))[1]  # (64, 2d) one row per patch
    full = torch.cat([identity_rope(table[:1]), table])  # token 0: the CLS token
    for method, opts in [("tome", dict(r=6)), ("evit", dict(keep_rate=0.5, layers=(1, 2))),
                         ("ats", dict(tokens=0.5, layers=(1, 2))), ("ppt", dict(r=10, layers=(1, 2)))]:
        f = leanvit.adapt(model, method, **opts)
        with torch.no_grad(), f.tracing(track_source=True):
            f(x)
        s = f.last_state
        assert s.rope is not None and s.rope.shape[:2] == s.x.shape[:2]
        for b in range(2):
            for i in range(int(s.counts()[b])):
                own = s.source[b, i].nonzero().flatten()
                if method == "evit" and i == s.counts()[b] - 1:  # the last fused token
                    assert torch.equal(s.rope[b, i], identity_rope(table[0])) and len(own) > 1
                if method == "evit" and len(own) > 1:  # a fused token (the first may survive, as a patch)
                    assert torch.equal(s.rope[b, i], identity_rope(table[0]))
                    continue
                assert any(torch.equal(s.rope[b, i], full[j]) for j in own), (method, b, i)
                if method in ("ats", "ppt") and len(own) == 1:
                    assert torch.equal(s.rope[b, i], full[own[0]])


@pytest.mark.parametrize("name", ["eva02_tiny", "rope_vit"])
def test_rope_positions_not_sequence_order(name):
    """With rotary rows carried per token, the patches' order in the sequence does not matter:
    the same tokens shuffled (rows with them) give the same logits (avg and CLS heads)."""
    model = family(name)
    f = leanvit.adapt(model, "none")
    x = images(2)
    with torch.no_grad():
        ref = f(x)
        state = f.embed(x)
        p = f.n_prefix
        perm = torch.cat([torch.arange(p), p + torch.randperm(64, generator=torch.Generator().manual_seed(0))])
        shuffled = state.gather(perm.expand(2, -1))
        torch.testing.assert_close(f.run(shuffled), ref, atol=1e-5, rtol=1e-5)


RAGGED = {**{k: (lambda k=k: _random_pool(MAP[k]())) for k in MAP},
          **{k: (lambda k=k: family(k)) for k in ("eva02_tiny", "pe_core_map")}}


@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_batch_equals_each_image_alone(name):
    """A ragged batch runs packed: the MAP head masks its padding, and each group's rotary rows
    are packed with its tokens."""
    f = leanvit.adapt(RAGGED[name](), AboveMean((1, 2)))
    x = images(4)
    with torch.no_grad(), f.tracing():
        logits = f(x)
    assert f.last_state.valid is not None and not bool(f.last_state.valid.all())
    with torch.no_grad():
        alone = torch.cat([f(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def test_eva_channel_slicing_refused():
    with pytest.raises(ValueError, match="only timm's Attention can be sliced"):
        leanvit.adapt(family("eva02_tiny"), "channels", heads=2)


def test_prance_on_eva_tokens_only():
    """PRANCE's channel choices need sliceable blocks: refused on EVA at adapt; its token choices run."""
    model = family("eva02_tiny")
    with pytest.raises(leanvit.OptionError, match="channels=false"):
        leanvit.adapt(model, "prance", stages=3)
    f = leanvit.adapt(model, "prance", stages=3, channels=False, strategy="prune-merge")
    with torch.no_grad():
        assert bool(torch.isfinite(f(images(3))).all())
