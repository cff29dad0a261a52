"""The API behaves like timm on edge cases: an empty batch gives an empty output, one bad image
(NaN) does not change the other images' logits, and casts carry the decision networks along."""
import pytest
import torch

import leanvit

from conftest import images, small_vit

# every registered method, with options that make it reduce on the small test ViT
METHODS = [("none", {}), ("tome", dict(r=4)), ("evit", dict(keep_rate=0.5)), ("ppt", dict(r=8, threshold="scaled")),
           ("ats", dict(tokens=0.5)), ("random", dict(keep_rate=0.5)), ("random", dict(keep_rate=0.5, independent=False)),
           ("dynamicvit", dict(keep_rate=0.6)), ("rl4evit", {}), ("prance", dict(strategy="prune")),
           ("prance", dict(strategy="prune-merge")), ("prance", dict(strategy="merge")), ("channels", dict(heads=0.5, mlp=0.5))]
IDS = [f"{m}-{o}" for m, o in METHODS]


def test_every_method_is_covered():
    assert {m for m, _ in METHODS} == set(leanvit.list_methods())


@pytest.mark.parametrize("method, opts", METHODS, ids=IDS)
def test_empty_batch_gives_an_empty_output(method, opts):
    m = small_vit()
    f = leanvit.adapt(m, method, **opts)
    x = torch.empty(0, 3, 32, 32)
    with torch.no_grad():
        out = f(x)
        assert out.shape == m(x).shape == (0, 10)
        assert leanvit.count_macs(f, images(1)) > 0  # and it still runs on a real batch after


@pytest.mark.parametrize("method, opts", METHODS, ids=IDS)
def test_a_nan_image_does_not_change_the_others(method, opts):
    torch.manual_seed(0)
    f = leanvit.adapt(small_vit(sharp=3.0), method, **opts)
    x = images(4)
    bad = x.clone()
    bad[1] = float("nan")
    with torch.no_grad():
        if method == "random":  # the same random draws for the batch with and without the bad image
            f.method.generator.manual_seed(0)
        out = f(bad)
        if method == "random":
            f.method.generator.manual_seed(0)
        ref = f(x)
    keep = [0, 2, 3]
    if method == "random":  # random draws depend on the batch, not on image values
        torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=1e-5)
    else:
        alone = torch.cat([f(x[i:i + 1]) for i in keep]) if method != "none" else ref[keep]
        torch.testing.assert_close(out[keep], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["rl4evit", "dynamicvit", "prance"])
def test_casts_carry_the_decision_networks(method):
    f = leanvit.adapt(small_vit(), method).double()
    assert all(p.dtype == torch.float64 for p in f.method.parameters())
    with torch.no_grad():
        out = f(images(2).double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
