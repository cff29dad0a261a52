"""Vision encoders (issue 15): token outputs (forward_tokens / unmerge), scoring without a CLS
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
