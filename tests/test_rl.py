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


# --------------------------------------------------------------------------- MAPPO's pieces
def test_value_norm_tracks_the_returns_and_inverts():
    from leanvit.rl import ValueNorm
    g = torch.Generator().manual_seed(0)
    vn = ValueNorm()
    seen = []
    for _ in range(5):
        x = 3.0 + 2.0 * torch.randn(200, generator=g)
        vn.update(x)
        seen.append(x)
    mean, std = vn.stats()
    allx = torch.cat(seen).double()
    # exact running moments: the mean and std of everything seen
    assert float(mean) == pytest.approx(float(allx.mean()), rel=1e-9)
    assert float(std) == pytest.approx(float(allx.std(unbiased=False)), rel=1e-9)
    y = torch.randn(7, generator=g)
    torch.testing.assert_close(vn.denormalize(vn.normalize(y)), y)
    assert abs(float(vn.normalize(allx.float()).mean())) < 1e-3
    # a weight masks what is not an agent's step
    w = ValueNorm()
    w.update(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert float(w.stats()[0]) == pytest.approx(2.0)


def test_orthogonal_init_gains():
    import math
    from leanvit.methods.rl4evit import mlp
    from leanvit.rl import orthogonal_init
    net = orthogonal_init(mlp([16, 32, 8, 2]), out_gain=0.01)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    for m, gain in zip(linears, [math.sqrt(2), math.sqrt(2), 0.01]):
        w = m.weight.double()
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # orthonormal rows (or columns) x gain
        torch.testing.assert_close(small, gain ** 2 * torch.eye(small.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        assert not m.bias.any()


# --------------------------------------------------------------------------- the budget controller
def test_budget_controller_never_goes_negative():
    """A policy far under budget (ratio 0.2, budget 0.5) for a long time: the weight stays at 0
    and so does the integral (no windup), so the first batch over budget raises the weight at once."""
    from leanvit.rl import BudgetController
    c = BudgetController(0.5, ki=0.05, kp=0.2, integral=0.3)
    weights = [c.update(0.2) for _ in range(50)]
    assert min(weights) == 0.0 and weights[-1] == 0.0 and c.integral == 0.0
    assert c.update(0.6) == pytest.approx(0.05 * 0.1 + 0.2 * 0.1)  # no debt to pay back first
    assert BudgetController(0.5, ki=0.1, kp=0.1, integral=-1.0).integral == 0.0  # a negative start is clamped


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_controller_converges_on_a_toy_plant(budget):
    """A plant whose GMACs ratio drifts, a fifth of the way per batch, toward 0.9 - 4 x weight
    (clipped to [0.1, 1]), overshooting on the way: the controller settles within 2% of the
    budget, its weight never negative; a budget above the plant's ratio at weight 0 ends at weight 0."""
    from leanvit.rl import BudgetController
    c = BudgetController(budget, ki=0.02, kp=0.1)
    ratio, seen, weights = 0.2, [], []  # starts far below: the weight must not wind down
    for _ in range(200):
        target = min(max(0.9 - 4 * c.cost_weight, 0.1), 1.0)
        ratio += 0.2 * (target - ratio)
        weights.append(c.update(ratio))
        seen.append(ratio)
    assert min(weights) >= 0.0 and max(seen) > budget  # it did overshoot
    assert all(abs(r / budget - 1) < 0.02 for r in seen[-30:])
    high = BudgetController(0.95, ki=0.02, kp=0.1)
    for _ in range(50):
        high.update(0.9)
    assert high.cost_weight == 0.0


def test_calibrate_bisects_to_the_budget():
    from leanvit.rl import calibrate
    ratio_at = lambda s: min(max(0.5 + 0.1 * s, 0.05), 1.0)  # noqa: E731 (monotone in the shift)
    s, r = calibrate(ratio_at, ratio_at(0.0), budget=0.3, tolerance=0.05)
    assert abs(r / 0.3 - 1) <= 0.025 and s < 0
    assert calibrate(ratio_at, 0.5, budget=0.5, tolerance=0.05) == (0.0, 0.5)


def test_calibrate_widens_its_bracket_for_a_confident_policy():
    """A policy whose outputs sit far out (the ratio only moves for shifts beyond the default span
    of 8) is still brought to the budget; beyond max_span it returns the nearest it saw."""
    from leanvit.rl import calibrate
    ratio_at = lambda s: min(max(0.45 + 0.02 * (s - 20), 0.45), 0.95)  # noqa: E731 (flat below 20)
    s, r = calibrate(ratio_at, 0.45, budget=0.7, tolerance=0.05)
    assert abs(r / 0.7 - 1) <= 0.025 and 20 < s <= 64
    s, r = calibrate(ratio_at, 0.45, budget=0.7, tolerance=0.05, max_span=16)
    assert r == 0.45 and s == 0.0  # nothing nearer within reach
