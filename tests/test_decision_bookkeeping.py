"""Leaner bookkeeping around per-image decisions gives the same decisions and logits as the
straightforward code it replaced (kept here as the reference): ATS samples on a grid of the most
patches (one host sync per layer, not two); PRANCE's greedy selector reads its means without building
a distribution and picks from option tensors made once."""
from __future__ import annotations

import pytest
import torch

import leanvit
from leanvit.data import EMBEDDED_CIFAR10, eval_transform, load_dataset
from leanvit.methods.ats import ATS
from leanvit.methods.prance import Prance
from leanvit.tokens import keep_mask

from conftest import images, run_traced, small_vit


class ReferenceATS(ATS):
    """ATS as it sampled before: a grid of ``k.max()`` points (its own host sync)."""

    def reduce(self, layer, state, attn):
        n = state.counts() - state.n_prefix
        if int(n.max()) <= 1:
            return state
        k = (self.tokens * n).round().long() if isinstance(self.tokens, float) else n.clamp(max=int(self.tokens))
        k = k.clamp(min=1)
        scores = attn.significance
        if state.valid is not None:
            scores = scores * state.valid[:, state.n_prefix:]
        cdf = scores.cumsum(dim=1)
        cdf = cdf / cdf[:, -1:]
        j = torch.arange(int(k.max()), device=cdf.device)
        points = (j.to(cdf.dtype) + 0.5) / k[:, None]
        points = torch.where(j < k[:, None], points, points[:, :1])
        picked = torch.searchsorted(cdf.contiguous(), points.contiguous(), right=True)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(1, picked.clamp_max(scores.shape[1] - 1), True)
        return keep_mask(state, keep)


class ReferencePrance(Prance):
    """PRANCE's greedy decisions as made before: the mean of a Normal, a new options tensor per pick."""

    def _options_tensor(self, options, dtype, device):
        return torch.tensor(options, dtype=dtype, device=device)

    def decide(self, state, k):
        if self.fixed is None and not self.random and not self.sampling:
            return self.to_choices(self.selector.distribution(self.features(state, k)).mean), None
        return super().decide(state, k)


def cifar_batch(model, n=32):
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(model))
    return torch.stack([ds[i][0] for i in range(n)])


def same_forward(a, b, x):
    """Both runners give the same logits and run the same per-image token counts and widths."""
    ya, ta, _ = run_traced(a, x, track_source=False)
    yb, tb, _ = run_traced(b, x, track_source=False)
    assert torch.equal(ya, yb)
    blocks = [(ra, rb) for ra, rb in zip(ta, tb) if ra["layer"] is not None]
    assert len(blocks) == len([r for r in tb if r["layer"] is not None]) > 0
    for ra, rb in blocks:
        assert torch.equal(ra["mlp_tokens"], rb["mlp_tokens"])
        for w in ("heads", "hidden"):
            assert (ra[w] is None and rb[w] is None) or torch.equal(torch.as_tensor(ra[w]), torch.as_tensor(rb[w]))
    return ta


@pytest.mark.parametrize("tokens", [1.0, 0.5, 0.25, 20, 3])
def test_ats_grid_of_the_most_patches_samples_the_same_tokens(tokens):
    m = small_vit(sharp=4.0)
    trace = same_forward(leanvit.adapt(m, ATS(tokens=tokens)), leanvit.adapt(m, ReferenceATS(tokens=tokens)),
                         images(12, seed=3))
    if tokens in (1.0, 20):  # ragged batches too: images' own counts, then their own k
        counts = [r["mlp_tokens"] for r in trace if r["layer"] is not None and r["layer"] >= 3]
        assert any(len(set(c.tolist())) > 1 for c in counts)


def test_ats_on_the_reference_model_samples_the_same_tokens():
    model = leanvit.load_model("cifar10_vit12_w128")
    same_forward(leanvit.adapt(model, ATS()), leanvit.adapt(model, ReferenceATS()), cifar_batch(model))


def test_prance_greedy_selector_decides_the_same():
    model = leanvit.load_model("cifar10_vit12_w128_prance")
    x = cifar_batch(model)
    fast, ref = (leanvit.adapt(model, cls(weights="cifar10_vit12_w128_prance")) for cls in (Prance, ReferencePrance))
    trace = same_forward(fast, ref, x)
    assert any(isinstance(r.get("hidden"), torch.Tensor) and len(set(r["hidden"].tolist())) > 1
               for r in trace)  # per-image MLP widths (the shipped selector gives every image one head)
    made = dict(fast.method.option_tensors)
    with torch.inference_mode():
        fast(x)
    assert fast.method.option_tensors.keys() == made.keys() and \
        all(fast.method.option_tensors[k] is made[k] for k in made)  # made once, reused


def test_prance_option_tensors_made_under_inference_serve_a_training_rollout():
    f = leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune")
    x = images(4)
    with torch.inference_mode():
        f(x)
    f.method.sampling = True
    f.train()
    f(x).sum().backward()  # a sampling forward with autograd, on the cached option tensors
    assert len(f.method.rollout) == f.method.n_stages - 1
