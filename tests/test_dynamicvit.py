"""DynamicViT: the policy-masked attention, real removal at inference, the keep-ratio loss."""
import pytest
import torch
import torch.nn.functional as F

import leanvit
from leanvit.flops import tokens_per_block
from leanvit.runtime import policy_attention

from conftest import images, small_vit


def _qkv(seed=0, B=2, H=2, N=7, D=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def test_policy_attention_all_kept_is_plain_attention():
    q, k, v = _qkv()
    torch.testing.assert_close(policy_attention(q, k, v, None, torch.ones(2, 7)),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_policy_attention_dropped_keys_are_removed_for_kept_queries():
    q, k, v = _qkv()
    policy = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    out = policy_attention(q, k, v, None, policy)
    for b in range(2):
        kept = policy[b].bool()
        ref = F.scaled_dot_product_attention(q[b:b + 1, :, kept], k[b:b + 1, :, kept], v[b:b + 1, :, kept])
        torch.testing.assert_close(out[b:b + 1, :, kept], ref, rtol=1e-4, atol=1e-5)


def test_policy_attention_stays_exact_and_bounded_on_peaked_attention():
    """A query whose largest key is dropped, with peaked attention (a logit gap of 40): the forward
    is still attention over the kept keys, and the gradient into the decisions stays of the size
    of the values (the authors' shift by the largest of all keys plus eps made this query attend
    uniformly and its gradient ~1/eps)."""
    q, k, v = _qkv(N=5)
    k = k.clone()
    k[0, 0, 2] = q[0, 0, 0] * 40 / q[0, 0, 0].norm() ** 2 * 2  # key 2: logit 40 for query 0 (scale 1/2)
    policy = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32, requires_grad=True)
    out = policy_attention(q, k, v, None, policy)
    kept = policy[0].detach().bool()
    ref = F.scaled_dot_product_attention(q[:1, :, kept], k[:1, :, kept], v[:1, :, kept])
    torch.testing.assert_close(out[:1, :, kept], ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad.abs().max() < 50 * v.abs().max()


def test_inference_keeps_rho_powers_for_real():
    f = leanvit.adapt(small_vit(), "dynamicvit", keep_rate=0.5)
    with torch.no_grad(), f.tracing() as trace:
        f(images(2))
    attn = tokens_per_block(trace, "attn_tokens")[:, 0].tolist()
    # predictors before blocks 3, 6, 9 keep 32, 16, 8 of the 64 patches (+ CLS)
    assert attn[:3] == [65] * 3 and attn[3:6] == [33] * 3 and attn[6:9] == [17] * 3 and attn[9:] == [9] * 3


def test_training_uses_gumbel_policies_and_the_ratio_loss():
    torch.manual_seed(0)
    model = small_vit().train()
    f = leanvit.adapt(model, "dynamicvit", keep_rate=0.7)
    f.train()
    logits = f(images(4))
    decisions = f.method.decisions
    assert len(decisions) == 3 and all(d.shape == (4, 64) for d in decisions)
    assert all(set(d.detach().unique().tolist()) <= {0.0, 1.0} for d in decisions)
    assert bool((decisions[1] <= decisions[0]).all() and (decisions[2] <= decisions[1]).all())  # cumulative
    loss = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)) + f.method.extra_loss()
    loss.backward()
    grads = [p.grad for p in f.method.predictors[0].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    expected = 2.0 * sum(((d.mean(1) - 0.7 ** (s + 1)) ** 2).mean() for s, d in enumerate(decisions))
    assert f.method.extra_loss().item() == pytest.approx(expected.item())
    f.eval()
    with torch.no_grad():
        f(images(1))
    assert f.method.extra_loss() is None  # only training forwards produce the loss


def test_predictor_weights_round_trip(tmp_path):
    from safetensors.torch import save_file
    f = leanvit.adapt(small_vit(), "dynamicvit")
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in f.method.state_dict().items()}, str(path))
    g = leanvit.adapt(small_vit(seed=1), "dynamicvit", weights=str(path))
    for (k, a), (_, b) in zip(f.method.state_dict().items(), g.method.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(leanvit.OptionError, match="cannot load"):
        leanvit.adapt(small_vit(), "dynamicvit", weights=str(tmp_path / "missing.safetensors"))


@pytest.mark.slow  # two short fine-tunings of the reference model: about a minute on 2 cores
def test_finetuning_depends_on_keep_rate(tmp_path):
    """`leanvit train --method dynamicvit` at keep rates 0.98 and 0.5 trains predictors that keep
    about those fractions (in training, Gumbel decisions) and ViTs that differ. Before the masked
    softmax was made exact, both keep rates trained the same predictors (keep
    fractions ~0.5/0.25/0.13) and ViTs within 2e-5 of each other."""
    from safetensors.torch import load_file
    from conftest import CIFAR
    from leanvit.data import eval_transform, load_dataset, make_loader
    from leanvit.train import TrainConfig, train
    start = leanvit.load_model("cifar10_vit12_w128")
    ds = load_dataset(str(CIFAR), split="test", transform=eval_transform(start), num_classes=10, limit=64)
    x = next(iter(make_loader(ds, batch_size=64, num_workers=0))).images
    with torch.no_grad():
        dense0 = start(x)
    tuned, kept = {}, {}
    for rho in (0.98, 0.5):
        out = tmp_path / f"k{rho}"
        train(TrainConfig(model="cifar10_vit12_w128", out=str(out), data=str(CIFAR), epochs=2, batch_size=16,
                          limit_train=160, limit_eval=16, workers=0, lr=1e-3, warmup_epochs=0, distill=0.5,
                          backbone_lr_scale=0.1, method="dynamicvit", options=dict(keep_rate=rho)),
              log=lambda s: None)
        w = load_file(str(out / "final.safetensors"))
        assert any(not torch.equal(w[k].float(), v.float()) for k, v in start.state_dict().items()
                   if k.startswith("blocks."))  # the ViT's weights moved
        model = leanvit.create_model("vit12_convstem_w128_cifar", checkpoint=str(out / "final.safetensors"))
        with torch.no_grad():
            tuned[rho] = model(x)
        runner = leanvit.adapt(model, "dynamicvit", keep_rate=rho, weights=str(out / "method.safetensors")).train()
        torch.manual_seed(0)
        with torch.no_grad():
            runner(x)
        kept[rho] = [float(d.mean()) for d in runner.method.decisions]
    # each keep rate's predictors move toward its own fractions (20 steps: 0.98 gets part of the way)
    assert all(abs(k - 0.5 ** (s + 1)) < 0.05 for s, k in enumerate(kept[0.5])), kept
    assert all(hi > lo + 0.1 for hi, lo in zip(kept[0.98], kept[0.5])), kept
    assert (tuned[0.98] - tuned[0.5]).abs().max() > 1e-2  # and the ViTs differ (2e-5 before the fix)
