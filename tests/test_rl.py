"""PPO pieces against hand computations (and torchrl's GAE when it is installed)."""
import pytest
import torch

from leanvit.rl import clipped_policy_loss, clipped_value_loss, gae


def test_gae_hand_computation():
    # one episode of 3 steps, gamma 0.5, lambda 0.5
    r = torch.tensor([1.0, 0.0, 2.0])
    v = torch.tensor([0.5, 1.0, 1.5])
    d = torch.tensor([0.0, 0.0, 1.0])
    adv, ret = gae(r, v, d, gamma=0.5, lam=0.5)
    d2 = 2.0 - 1.5                       # last step: episode ends, no bootstrap
    d1 = 0.0 + 0.5 * 1.5 - 1.0           # -0.25
    d0 = 1.0 + 0.5 * 1.0 - 0.5           # 1.0
    a2 = d2
    a1 = d1 + 0.25 * a2
    a0 = d0 + 0.25 * a1
    assert adv.tolist() == pytest.approx([a0, a1, a2])
    assert ret.tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])


def test_gae_bootstraps_and_resets_at_episode_ends():
    r = torch.tensor([[1.0], [1.0]])
    v = torch.tensor([[0.0], [0.0]])
    adv, _ = gae(r, v, torch.tensor([[1.0], [0.0]]), last_value=torch.tensor([10.0]), gamma=1.0, lam=1.0)
    assert adv[:, 0].tolist() == [1.0, 11.0]  # step 0 ends an episode: nothing flows back from step 1


def test_gae_matches_torchrl():
    functional = pytest.importorskip("torchrl.objectives.value.functional")
    g = torch.Generator().manual_seed(0)
    T, B = 5, 4
    r, v = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g)
    d = torch.zeros(T, B)
    d[-1] = 1
    d[2, 1] = 1
    next_v = torch.cat([v[1:], torch.zeros(1, B)])
    ours, _ = gae(r, v, d, gamma=0.9, lam=0.8)
    # torchrl: time on dim -2, trailing feature dim of 1
    ref, _ = functional.generalized_advantage_estimate(
        0.9, 0.8, v.T[..., None], next_v.T[..., None], r.T[..., None], d.T[..., None].bool(),
        terminated=d.T[..., None].bool())
    torch.testing.assert_close(ours, ref[..., 0].T)


def test_clipped_policy_loss_hand_case():
    adv = torch.tensor([1.0, -1.0, 1.0])
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 1.5, 0.9]))
    # ratios 1.5, 1.5, 0.9 with clip 0.2: min(1.5*1, 1.2*1)=1.2; min(-1.5, -1.2)=-1.5; min(0.9, 0.9)=0.9
    loss = clipped_policy_loss(new, old, adv, clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.9) / 3)
    w = torch.tensor([1.0, 0.0, 1.0])
    assert clipped_policy_loss(new, old, adv, 0.2, weight=w).item() == pytest.approx(-(1.2 + 0.9) / 2)


def test_clipped_value_loss_hand_case():
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([1.0, 0.1])
    ret = torch.tensor([2.0, 0.0])
    # first: plain (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; second: plain 0.01, clipped 0.01
    assert clipped_value_loss(new, old, ret, clip=0.2).item() == pytest.approx((3.24 + 0.01) / 2)
