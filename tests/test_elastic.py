"""Channel elasticity: first-k slicing runs smaller matmuls, full width is the model itself,
reordering by importance changes nothing the model computes, MACs follow the widths."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.nn.attention import SDPBackend, sdpa_kernel

import leanvit
from leanvit.elastic import reorder_by_importance

from conftest import images, small_vit


def test_full_width_equals_the_model():
    m = small_vit()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(leanvit.adapt(m, "channels", heads=4, mlp=256)(x), m(x), rtol=0, atol=1e-5)


def test_reordering_preserves_the_function():
    m = small_vit(sharp=2.0)
    x = images(2)
    with torch.no_grad():
        before = m(x)
        reorder_by_importance(m)
        torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    # most important first: the head path norms are non-increasing
    attn = m.blocks[0].attn
    H, d = attn.num_heads, attn.head_dim
    v = attn.qkv.weight.view(3, H, d, -1)[2].flatten(1).norm(dim=1)
    p = attn.proj.weight.view(-1, H, d).transpose(0, 1).flatten(1).norm(dim=1)
    score = v * p
    assert bool((score[:-1] >= score[1:]).all())


def test_sliced_equals_a_smaller_model():
    """Slicing to the first 2 heads / 64 neurons == a model built with those weights only."""
    m = small_vit()
    x = images(2)
    f = leanvit.adapt(m, "channels", heads=2, mlp=64)
    # build the reference by hand from the big model's weights
    with torch.no_grad():
        ref_blocks = []
        for blk in m.blocks:
            a, d = blk.attn, blk.attn.head_dim
            rows = torch.cat([torch.arange(2 * d) + j * a.num_heads * d for j in range(3)])
            ref_blocks.append((a.qkv.weight[rows], a.qkv.bias[rows], a.proj.weight[:, :2 * d],
                               blk.mlp.fc1.weight[:64], blk.mlp.fc1.bias[:64], blk.mlp.fc2.weight[:, :64]))
        x_tok = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk, (wq, bq, wp, w1, b1, w2) in zip(m.blocks, ref_blocks):
            h = blk.norm1(x_tok)
            B, N, _ = h.shape
            q, k, v = torch.nn.functional.linear(h, wq, bq).reshape(B, N, 3, 2, -1).permute(2, 0, 3, 1, 4)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
            x_tok = x_tok + torch.nn.functional.linear(o, wp, blk.attn.proj.bias)
            hid = blk.mlp.act(torch.nn.functional.linear(blk.norm2(x_tok), w1, b1))
            x_tok = x_tok + torch.nn.functional.linear(hid, w2, blk.mlp.fc2.bias)
        ref = m.forward_head(m.norm(x_tok))
        torch.testing.assert_close(f(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, mlp", [(2, 64), (1, 0.25), ([4, 3, 2, 1] * 3, [256, 128, 64, 32] * 3)])
def test_macs_follow_widths_and_match_the_executed_graph(heads, mlp):
    m = small_vit()
    x = images(2)
    f = leanvit.adapt(m, "channels", heads=heads, mlp=mlp)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        f(x)
    analytic = leanvit.count_macs(f, x) * 1e9
    assert analytic * 2 == pytest.approx(counter.get_total_flops() / x.shape[0], rel=0.01)
    assert analytic < leanvit.count_macs(m, x) * 1e9


def test_width_errors():
    m = small_vit()
    with pytest.raises(leanvit.OptionError, match="heads must be in 1..4"):
        leanvit.adapt(m, "channels", heads=5)
    with pytest.raises(leanvit.OptionError, match="one entry per block"):
        leanvit.adapt(m, "channels", mlp=[64, 64])


def test_sliced_weights_are_cached_at_inference_and_follow_weight_updates():
    """Narrow widths run on contiguous copies of the weight slices, kept while the weights are
    unchanged; an in-place update (an optimizer step, load_state_dict) refreshes them, and with
    gradients on the slices are not cached at all."""
    from leanvit.elastic import mlp_forward
    from timm.layers import Mlp
    torch.manual_seed(0)
    mlp = Mlp(8, 16).eval()
    x = torch.randn(5, 8)

    def reference():
        h = torch.nn.functional.gelu(x @ mlp.fc1.weight[:4].T + mlp.fc1.bias[:4])
        return h @ mlp.fc2.weight[:, :4].T + mlp.fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(mlp_forward(mlp, x, 4), reference())
        assert ("out", 4) in mlp.fc1.__dict__["_leanvit_slices"]
        mlp.fc1.weight.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(mlp_forward(mlp, x, 4), reference())
    mlp.fc1.__dict__.pop("_leanvit_slices")
    out = mlp_forward(mlp, x, 4)  # gradients on: no cache, the gradient reaches the weights
    out.sum().backward()
    assert "_leanvit_slices" not in mlp.fc1.__dict__ and mlp.fc1.weight.grad[:4].abs().sum() > 0
