"""The block runner (leanvit.runtime): exact equivalence with timm, refusal of unsupported models,
input checks, masked (ragged) execution == per-image execution, source tracking, gradients."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import ResPostBlock

import leanvit
from leanvit import OptionError, UnsupportedModelError

from conftest import AboveMean, images, mlp_counts, run_traced, sharpen, small_vit


# --------------------------------------------------------------------------- equivalence with timm
def _perturb_layerscale(model):
    """DeiT-III's LayerScale starts at 1e-5 (blocks ~identity); randomise it so it matters."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.normal_(0.0, 1.0)
            blk.ls2.gamma.normal_(0.0, 1.0)
    return model


# id -> (model factory, input image size)
VARIANTS = {
    "deit_cls": (lambda: small_vit(depth=4), 32),
    "distilled": (lambda: small_vit(depth=4, distilled=True), 32),
    "deit3_layerscale_no_embed_class": (
        lambda: _perturb_layerscale(small_vit(depth=4, init_values=1e-5, no_embed_class=True)), 32),
    "qk_norm": (lambda: small_vit(depth=4, qk_norm=True), 32),
    "avg_pool_no_cls": (lambda: small_vit(depth=4, global_pool="avg", class_token=False), 32),
    "avg_pool_include_prefix": (lambda: small_vit(depth=4, global_pool="avg", pool_include_prefix=True), 32),
    "max_pool": (lambda: small_vit(depth=4, global_pool="max"), 32),
    "avgmax_pool_regs": (lambda: small_vit(depth=4, global_pool="avgmax", reg_tokens=2), 32),
    "reg_tokens_4": (lambda: small_vit(depth=4, reg_tokens=4), 32),
    "reg_tokens_no_cls_avg": (lambda: small_vit(depth=4, reg_tokens=4, class_token=False,
                                                global_pool="avg", no_embed_class=True), 32),
    "dynamic_img_size_other_res": (lambda: small_vit(depth=4, dynamic_img_size=True), 48),
    "scale_norms_pre_norm_no_qkv_bias": (
        lambda: small_vit(depth=3, scale_attn_norm=True, scale_mlp_norm=True, pre_norm=True, qkv_bias=False), 32),
    "wide_patch8_nonsquare_mlp2": (
        lambda: small_vit(depth=3, img_size=(64, 48), patch_size=8, embed_dim=96, num_heads=3, mlp_ratio=2.0), (64, 48)),
    "vit_tiny_create_model_64": (
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=5,
                                  num_classes=7).eval(), 64),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_none_matches_timm_logits(variant, mode, device):
    build, size = VARIANTS[variant]
    model = sharpen(build(), 2.0).to(device)
    model.train(mode == "train")
    x = images(3, size).to(device)
    f = leanvit.adapt(model, "none")
    f.train(mode == "train")
    with torch.no_grad():
        ref = model(x)
        out = f(x)
        with f.tracing():  # a trace records what ran: leanvit's own block runner, never timm's Block.forward
            general = f(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5
    assert (general - ref).abs().max().item() <= 1e-5


def test_blocks_with_nothing_to_do_run_timms_own_forward():
    """Where a block has nothing of leanvit's (no decision in or after it, every token real and
    unmerged, full width, not tracing) it is timm's Block.forward itself, bit for bit; the others
    run leanvit's block runner."""
    m = sharpen(small_vit(), 2.0)
    x = images(3)
    called = []
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, args, out, i=i: called.append(i))
    with torch.no_grad():
        ref = m(x)
        called.clear()
        assert torch.equal(leanvit.adapt(m, "none")(x), ref) and called == list(range(12))
        called.clear()
        traced = leanvit.adapt(m, "none")
        with traced.tracing():
            traced(x)
        assert called == []
        called.clear()
        leanvit.adapt(m, "evit", keep_rate=0.5)(x)  # decisions in 3, 6, 9; its fused token has a size
        assert called[:3] == [0, 1, 2] and not {3, 6, 9} & set(called)
        called.clear()
        leanvit.adapt(m, "channels", heads=0.5)(x)  # every block sliced
        assert called == []


def test_none_matches_timm_deit_tiny_224(x224):
    from conftest import deit
    m = deit("tiny")
    with torch.no_grad():
        assert (leanvit.adapt(m, "none")(x224) - m(x224)).abs().max().item() <= 1e-5


def test_adapt_eval_model_has_no_attention_dropout():
    model = small_vit(depth=2, attn_drop_rate=0.5)  # eval mode
    f = leanvit.adapt(model, "none")
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(f(x), model(x), atol=1e-5)


def test_original_model_unmodified_and_usable():
    model = sharpen(small_vit(depth=6), 3.0)
    x = images(4)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    for method, opts in [("tome", dict(r=5)), ("ppt", dict(r=8, layers=(1, 3))), ("evit", dict(layers=(1, 3))),
                         ("ats", dict(layers=(2, 4))), ("random", dict(layers=(1,)))]:
        f = leanvit.adapt(model, method, **opts)
        assert f.model is model  # shared, not copied
        with torch.no_grad():
            f(x)
        leanvit.count_macs(f, x)
    model.eval()  # (count_macs may flip the mode: see test_count_macs_keeps_model_mode in test_flops.py)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert "forward" not in vars(model)  # no monkeypatching of the instance or its blocks
    assert all("forward" not in vars(b) for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_adapt_unwraps_leanvit_and_rejects_options_with_instance():
    model = small_vit(depth=4)
    f = leanvit.adapt(model, "tome", r=3)
    g = leanvit.adapt(f, "none")
    assert g.model is model
    with pytest.raises(OptionError):
        leanvit.adapt(model, leanvit.build_method("tome", r=3), r=4)
    with pytest.raises(OptionError):
        leanvit.adapt(model, 42)


# --------------------------------------------------------------------------- unsupported models
def test_attention_pools_other_than_map_unsupported():
    model = small_vit(depth=2, global_pool="prr")
    with pytest.raises(UnsupportedModelError, match="'prr' \\(AttentionPoolPrr\\)"):
        leanvit.adapt(model, "none")
    model = small_vit(depth=2, global_pool="map")
    model.attn_pool.pos_embed = nn.Parameter(torch.zeros(64, 64))
    with pytest.raises(UnsupportedModelError, match="pos_embed"):
        leanvit.adapt(model, "none")


def test_res_post_block_unsupported():
    model = small_vit(depth=3, block_fn=ResPostBlock)
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        leanvit.adapt(model, "tome")


def test_single_replaced_block_unsupported_names_index():
    model = small_vit(depth=3)
    model.blocks[2] = ResPostBlock(dim=64, num_heads=4)
    with pytest.raises(UnsupportedModelError, match=r"block 2 is ResPostBlock"):
        leanvit.adapt(model)


@pytest.mark.parametrize("make, name", [
    (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), "ResNet"),
    (lambda: nn.Linear(4, 4), "Linear"),
])
def test_non_vit_unsupported(make, name):
    with pytest.raises(UnsupportedModelError, match=name):
        leanvit.adapt(make(), "none")
    with pytest.raises(UnsupportedModelError):
        leanvit.count_macs(make(), images(1))


def test_errors_are_value_errors():
    assert issubclass(UnsupportedModelError, ValueError)
    assert issubclass(OptionError, ValueError)


# --------------------------------------------------------------------------- input checks
def test_wrong_image_size_names_both_sizes():
    f = leanvit.adapt(small_vit(depth=2, img_size=64, patch_size=8), "none")
    with pytest.raises(ValueError) as e:
        f(images(1, 48))
    assert "64x64" in str(e.value) and "48x48" in str(e.value)


def test_wrong_image_size_nonsquare():
    f = leanvit.adapt(small_vit(depth=2, img_size=(32, 48)), "none")
    with pytest.raises(ValueError) as e:
        f(images(1, (48, 32)))
    assert "32x48" in str(e.value) and "48x32" in str(e.value)


def test_wrong_channel_count():
    f = leanvit.adapt(small_vit(depth=2), "none")
    with pytest.raises(ValueError) as e:
        f(images(1, chans=1))
    assert "3" in str(e.value) and "1 channel" in str(e.value)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (65, 64)])
def test_non_4d_input(shape):
    f = leanvit.adapt(small_vit(depth=2), "none")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        f(torch.zeros(shape))


# --------------------------------------------------------------------------- masked == gathered
def _alone(f, x):
    with torch.no_grad():
        return torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])])


def _assert_ragged(trace):
    counts = torch.stack([r["mlp_tokens"] for r in trace if r["layer"] is not None])  # (depth, B)
    assert any(len(set(row.tolist())) > 1 for row in counts), "batch never became ragged"


@pytest.mark.parametrize("kw", [
    dict(),
    dict(global_pool="avg"),
    dict(global_pool="max", class_token=False),
    dict(global_pool="avgmax", reg_tokens=3),
    dict(distilled=True),
], ids=["cls", "avg", "max_no_cls", "avgmax_regs", "distilled"])
def test_masked_equals_gathered_ragged_method(kw, device):
    model = small_vit(sharp=4.0, **kw).to(device)
    f = leanvit.adapt(model, AboveMean(layers=(3, 5, 7, 9)))
    x = images(5).to(device)
    y, trace, state = run_traced(f, x)
    _assert_ragged(trace)
    assert state.valid is not None and not bool(state.valid.all())
    assert torch.allclose(y, _alone(f, x), atol=1e-4, rtol=0)


def test_masked_equals_gathered_ats_one_layer():
    """ATS at one layer (no padding at decision time): every later block runs masked."""
    f = leanvit.adapt(small_vit(sharp=4.0), "ats", layers=(3,))
    x = images(5)
    y, trace, _ = run_traced(f, x)
    _assert_ragged(trace)
    assert torch.allclose(y, _alone(f, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tokens", [1.0, 20])
def test_masked_equals_gathered_ats_all_layers(tokens):
    f = leanvit.adapt(small_vit(sharp=4.0), "ats", tokens=tokens)
    x = images(4)
    y, trace, _ = run_traced(f, x)
    _assert_ragged(trace)
    alone_counts = []
    for i in range(4):
        _, tr, _ = run_traced(f, x[i:i + 1])
        alone_counts.append([int(r["mlp_tokens"][0]) for r in tr])
    assert [list(c) for c in zip(*mlp_counts(trace))] == alone_counts
    assert torch.allclose(y, _alone(f, x), atol=1e-4, rtol=0)


def _ppt_layer_variances(model, x, layers, r):
    """Per-image significance variance PPT sees at each layer (spying on the method)."""
    meth = leanvit.build_method("ppt", r=r, layers=layers, threshold=1e9)
    seen = {}
    orig = meth.reduce

    def spy(layer, state, attn):
        seen[layer] = attn.significance.var(dim=1, unbiased=True).clone()
        return orig(layer, state, attn)

    meth.reduce = spy
    with torch.no_grad():
        leanvit.adapt(model, meth)(x)
    return seen


def mixed_ppt(model, x, layers=(3, 6, 9), r=8):
    """A PPT runner whose threshold splits the batch at the first PPT layer (some prune, some pool)."""
    var = _ppt_layer_variances(model, x, layers, r)[layers[0]].sort().values
    mid = x.shape[0] // 2
    thr = float((var[mid - 1] * var[mid]).sqrt())  # geometric mean of two neighbouring variances
    f = leanvit.adapt(model, "ppt", r=r, layers=layers, threshold=thr)
    return f, thr


@pytest.mark.parametrize("distilled", [False, True])
def test_ppt_mixed_policy_batch_equals_each_image_alone(distilled, device):
    model = small_vit(sharp=3.0, distilled=distilled).to(device)
    x = images(6, seed=5).to(device)
    f, _ = mixed_ppt(model, x)
    f.method.reset_stats()
    y, trace, state = run_traced(f, x)
    frac = f.method.prune_fraction()
    assert 0.0 < frac[3] < 1.0, frac  # a genuinely mixed batch
    assert frac[3] == pytest.approx(0.5)
    assert torch.allclose(y, _alone(f, x), atol=1e-4, rtol=0)
    # the same per-image policies as alone
    f.method.reset_stats()
    _alone(f, x)
    assert f.method.prune_fraction() == frac


# --------------------------------------------------------------------------- source tracking
def _check_prefix_maps_to_itself(state, n_prefix):
    src = state.source
    eye = torch.eye(src.shape[-1])[:n_prefix]
    assert torch.equal(src[:, :n_prefix], eye.expand(src.shape[0], -1, -1))


def _coverage(state):
    """(B, N0) how many final (real) tokens cover each input token."""
    src = state.source
    if state.valid is not None:
        src = src * state.valid[..., None]
    return src.sum(1)


@pytest.mark.parametrize("method, opts, distilled", [
    ("tome", dict(r=6), False),
    ("tome", dict(r=6), True),
    ("tome", dict(r=40), True),  # r capped at half the mergeable tokens
    ("ppt", dict(r=8, threshold=1e9), False),  # every image pools
    ("ppt", dict(r=8, threshold=1e9), True),
])
def test_source_merge_methods_cover_every_input_once(method, opts, distilled):
    n_prefix = 2 if distilled else 1
    model = small_vit(sharp=3.0, distilled=distilled)
    f = leanvit.adapt(model, method, **opts)
    y, trace, state = run_traced(f, images(3))
    assert state.source.shape == (3, state.n_tokens, 65 + distilled)
    assert state.n_tokens < 65  # something merged
    assert torch.equal(_coverage(state), torch.ones(3, 65 + distilled))
    assert torch.equal(state.source.sum(-1), state.sizes())
    assert set(state.source.unique().tolist()) <= {0.0, 1.0}
    _check_prefix_maps_to_itself(state, n_prefix)
    assert torch.equal(state.sizes()[:, :n_prefix], torch.ones(3, n_prefix))


@pytest.mark.parametrize("distilled", [False, True])
def test_source_evit_fuse_covers_every_input_once(distilled):
    model = small_vit(sharp=3.0, distilled=distilled)
    f = leanvit.adapt(model, "evit", keep_rate=0.7, fuse=True)
    _, _, state = run_traced(f, images(3))
    n0 = 65 + distilled
    assert torch.equal(_coverage(state), torch.ones(3, n0))
    _check_prefix_maps_to_itself(state, 1 + distilled)
    # the fused token counts as an ordinary token (size 1) but stands for many patches
    assert torch.equal(state.sizes(), torch.ones_like(state.sizes()))
    assert bool((state.source[:, -1].sum(-1) > 1).all())


@pytest.mark.parametrize("method, opts", [
    ("evit", dict(fuse=False)),
    ("ppt", dict(r=8, threshold=1e-30)),  # every image prunes
    ("random", dict(independent=False)),
    ("random", dict(independent=True)),
    ("ats", dict()),
])
@pytest.mark.parametrize("distilled", [False, True])
def test_source_pruning_methods_cover_inputs_at_most_once(method, opts, distilled):
    n0, n_prefix = 65 + distilled, 1 + distilled
    f = leanvit.adapt(small_vit(sharp=3.0, distilled=distilled), method, **opts)
    _, _, state = run_traced(f, images(4))
    cov = _coverage(state)
    assert bool((cov <= 1).all())
    assert bool((cov.sum(1) < n0).all())  # something was dropped in every image
    assert torch.equal(cov.sum(1), state.counts().to(cov.dtype))  # each real token is one input token
    real = state.source if state.valid is None else state.source[state.valid]
    assert torch.equal(real.sum(-1), torch.ones_like(real.sum(-1)))
    _check_prefix_maps_to_itself(state, n_prefix)


@pytest.mark.parametrize("distilled", [False, True])
def test_source_mixed_policy_ppt(distilled):
    n0, n_prefix = 65 + distilled, 1 + distilled
    model = small_vit(sharp=3.0, distilled=distilled)
    x = images(6, seed=5)
    f, thr = mixed_ppt(model, x, layers=(3,), r=8)
    var = _ppt_layer_variances(model, x, (3,), 8)[3]
    prune = var >= thr
    assert 0 < int(prune.sum()) < 6
    _, _, state = run_traced(f, x)
    cov = _coverage(state)
    # pooled images: every input token exactly once, sizes add up; pruned: r inputs gone, none twice
    assert torch.equal(cov[~prune], torch.ones(int((~prune).sum()), n0))
    assert bool((cov[prune] <= 1).all())
    assert torch.equal(cov[prune].sum(1), torch.full((int(prune.sum()),), float(n0 - 8)))
    assert torch.equal(state.source.sum(-1), state.sizes())
    assert torch.equal(state.sizes()[prune], torch.ones(int(prune.sum()), n0 - 8))
    _check_prefix_maps_to_itself(state, n_prefix)
    # tracing per image alone gives the same sources
    for i in range(6):
        _, _, si = run_traced(f, x[i:i + 1])
        assert torch.equal(si.source[0], state.source[i])


def test_reg_tokens_prefix_stays_in_front_through_tome_and_ppt():
    model = small_vit(sharp=3.0, reg_tokens=4)
    for method, opts in [("tome", dict(r=7)), ("ppt", dict(r=8, threshold=1e9)), ("ppt", dict(r=8, threshold=1e-30))]:
        _, _, state = run_traced(leanvit.adapt(model, method, **opts), images(2))
        _check_prefix_maps_to_itself(state, 5)


def test_tracing_restores_state_and_records_every_block():
    f = leanvit.adapt(small_vit(depth=5), "tome", r=4)
    x = images(2)
    with torch.no_grad(), f.tracing(track_source=True) as trace:
        f(x)
    assert [r["layer"] for r in trace] == list(range(5))
    assert f.track_source is False and f._trace is None
    assert [int(r["attn_tokens"][0]) for r in trace] == [65, 61, 57, 53, 49]
    assert [int(r["mlp_tokens"][0]) for r in trace] == [61, 57, 53, 49, 45]
    assert [r["mlp_run"] for r in trace] == [61, 57, 53, 49, 45]  # one batch: what ran is what it needs


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method, opts", [
    ("tome", dict(r=6)),
    ("evit", dict(keep_rate=0.7, fuse=True)),
    ("ppt", dict(r=8, threshold=1e9)),
    ("ppt", dict(r=8, threshold=1e-30)),
])
def test_gradients_flow_in_train_mode(method, opts):
    model = small_vit(depth=6, sharp=2.0)
    model.train()
    if method != "tome":
        opts = {**opts, "layers": (1, 3)}
    f = leanvit.adapt(model, method, **opts)
    f.train()
    x = images(3)
    y = f(x)
    loss = nn.functional.cross_entropy(y, torch.tensor([0, 1, 2]))
    loss.backward()
    named = dict(model.named_parameters())
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight",
                 "blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight", "blocks.5.attn.qkv.weight"]:
        g = named[name].grad
        assert g is not None, name
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name
    missing = [n for n, p in named.items() if p.requires_grad and p.grad is None]
    assert missing == []


# --------------------------------------------------------------------------- proportional attention
class DropPatch(leanvit.Reduction):
    """Control: drop one patch at one layer (no size bookkeeping)."""

    name = "test-drop-patch"

    def __init__(self, layer, patch):
        self.layer, self.patch = layer, patch

    def decision_layers(self):
        return (self.layer,)

    def reduce(self, layer, state, attn):
        from leanvit.tokens import keep_mask
        keep = torch.ones(state.batch, state.n_patches, dtype=torch.bool)
        keep[:, self.patch] = False
        return keep_mask(state, keep)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_merging_identical_tokens_with_proportional_attention_is_exact(pool):
    """Two identical tokens merged into one of size 2 must change nothing: log(2) on its attention
    logit stands for the second copy, and the size-weighted average pool counts it twice."""
    model = small_vit(depth=4, sharp=2.0, global_pool=pool)
    with torch.no_grad():
        model.pos_embed[:, 2] = model.pos_embed[:, 1]
    x = images(2)
    x[..., 0:4, 4:8] = x[..., 0:4, 0:4]  # patch 1 == patch 0, so tokens 1 and 2 are identical
    with torch.no_grad():
        ref = model(x)
    f = leanvit.adapt(model, "tome", r=[1])  # one merge, in block 0
    y, _, state = run_traced(f, x)
    assert state.n_tokens == 64
    merged = (state.sizes() == 2).nonzero()
    assert merged.shape[0] == 2  # one token per image
    for b, t in merged.tolist():
        assert state.source[b, t].nonzero().flatten().tolist() == [1, 2]
    assert (y - ref).abs().max().item() <= 1e-5
    # control: removing the copy without its size changes the logits
    with torch.no_grad():
        dropped = leanvit.adapt(model, DropPatch(0, 1))(x)
    assert (dropped - ref).abs().max().item() > 1e-3


def test_random_seed_reproducible():
    model = small_vit(sharp=2.0)
    x = images(4)
    a, b = leanvit.adapt(model, "random", seed=7), leanvit.adapt(model, "random", seed=7)
    c = leanvit.adapt(model, "random", seed=8)
    with torch.no_grad():
        ya, yb, yc = a(x), b(x), c(x)
    assert torch.equal(ya, yb)
    assert not torch.allclose(ya, yc)


# --------------------------------------------------------------------------- masked execution
@pytest.mark.parametrize("method, opts", [
    ("evit", dict(keep_rate=0.6, fuse=False)),
    ("ppt", dict(r=12, threshold=0.0)),  # every image prunes
    ("ats", dict(tokens=0.8)),
    ("above_mean", {}),  # a deterministic per-image (ragged) decision from conftest
])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_masked_execution_equals_removal(method, opts, pool, device):
    """Masked execution (pruned tokens stay, marked invalid: how learned methods train) gives the
    logits and token counts of real removal."""
    model = small_vit(sharp=4.0, global_pool=pool).eval().to(device)
    x = images(3).to(device)
    runs = {}
    for masked in (False, True):
        f = leanvit.adapt(model, AboveMean((3, 6, 9)) if method == "above_mean" else method, **opts)
        f.masked = masked
        with torch.no_grad(), f.tracing() as trace:
            logits = f(x)
        runs[masked] = (logits, [rec["mlp_tokens"].tolist() for rec in trace], f.last_state)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    assert runs[True][1] == runs[False][1]  # same kept-token counts per image and layer
    assert runs[True][2].x.shape[1] == 65  # masked: the batch kept its shape
    assert runs[False][2].x.shape[1] < 65


def test_masked_execution_keeps_gradients_flowing():
    model = small_vit(sharp=4.0).train()
    f = leanvit.adapt(model, "random", keep_rate=0.5, independent=True)
    f.masked = True
    f(images(2)).sum().backward()
    assert all(p.grad is not None for p in model.blocks[11].parameters())
