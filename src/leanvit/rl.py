"""PPO pieces shared by RL4EViT (one agent per token) and PRANCE (one agent per image), under the
trainer of :mod:`leanvit.ppo`: GAE, the clipped losses, MAPPO's value normalisation and initialisation, and the budget controller with the
calibration both trainings use to land on a GMACs budget.

Written out rather than taken from torchrl: torchrl's PPO losses expect TensorDict-wrapped
actor/critic modules and a fixed time axis, while here a trajectory is a few decision layers
whose agents (tokens) change from step to step (an agent's episode ends when its token is pruned,
and the batch of agents shrinks), and the whole PPO step is some 30 lines. The GAE below is checked
against torchrl's functional ``generalized_advantage_estimate`` in the tests when torchrl is installed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .options import arg, check_fields, nonnegative, positive, positive_int, unit


@dataclass
class PPOConfig:
    """Hyperparameters with the RL4EViT paper's defaults (MAPPO's where the paper defers to it).
    Checked like the command line's options when made in Python."""

    clip: float = arg(0.2, positive)  # epsilon of the clipped surrogate and of the clipped value loss
    gamma: float = arg(0.99, unit)  # discount over the decision steps
    lam: float = arg(0.95, unit)  # GAE lambda
    epochs: int = arg(15, positive_int, "K PPO iterations per batch", flag="--ppo-epochs")
    lr_actor: float = arg(5e-5, positive)
    lr_critic: float = arg(5e-5, positive)
    value_coef: float = 1.0
    # MAPPO's, the RL4EViT authors' and the PRANCE authors' 0.01
    entropy_coef: float = arg(0.01, nonnegative, "weight of the policy's entropy bonus in the actor's loss")
    max_grad_norm: float = 10.0

    def __post_init__(self):
        check_fields(self)


def gae(rewards: Tensor, values: Tensor, dones: Tensor, last_value: Optional[Tensor] = None,
        gamma: float = 0.99, lam: float = 0.95):
    """Generalized Advantage Estimation over the first (time) dimension.

    rewards, values, dones: (T, ...) with dones[t] = 1 when the episode ends after step t.
    last_value: (...) value of the state after the last step (0 if omitted). Returns
    ``(advantages, returns)`` with returns = advantages + values.
    """
    T = rewards.shape[0]
    next_value = torch.zeros_like(values[0]) if last_value is None else last_value
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(values[0])
    for t in reversed(range(T)):
        not_done = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        adv[t] = running
        next_value = values[t]
    return adv, adv + values


def clipped_policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip: float,
                        weight: Optional[Tensor] = None) -> Tensor:
    """PPO's clipped surrogate, negated to be minimised; ``weight`` masks/weights the agents."""
    ratio = (logp_new - logp_old).exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -_mean(surrogate, weight)


def clipped_value_loss(values_new: Tensor, values_old: Tensor, returns: Tensor, clip: float,
                       weight: Optional[Tensor] = None) -> Tensor:
    """MAPPO's clipped value loss: max of the plain and the clipped squared error."""
    clipped = values_old + (values_new - values_old).clamp(-clip, clip)
    loss = torch.maximum((values_new - returns) ** 2, (clipped - returns) ** 2)
    return _mean(loss, weight)


def _mean(t: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is None:
        return t.mean()
    return (t * weight).sum() / weight.sum().clamp_min(1e-8)


class ValueNorm(nn.Module):
    """MAPPO's value normalisation: the critic predicts returns normalised by the mean and standard
    deviation of every return seen so far (exact running moments, batches combined as Chan et al.;
    MAPPO's debiased average with beta = 0.99999 is nearly the same). With rewards whose scale moves
    (alpha or a cost weight under a budget controller) the critic's targets stay of unit size.
    ``total`` sums a list of floats over the processes (``training.all_sum`` under torchrun), so every
    replica keeps the same statistics. The statistics are buffers: they go into ``state_dict``."""

    def __init__(self, total: Optional[Callable[[list], list]] = None, min_var: float = 1e-2):
        super().__init__()
        self.total, self.min_var = total or (lambda xs: xs), min_var  # MAPPO's floor on the variance
        for name, value in (("mean", 0.0), ("var", 1.0), ("count", 0.0)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64))

    def update(self, x: Tensor, weight: Optional[Tensor] = None) -> None:
        """Add the returns ``x`` (``weight`` 0 masks what is not an agent's step)."""
        x = x.detach().double()
        w = torch.ones_like(x) if weight is None else weight.detach().double().expand_as(x)
        n, total, squares = self.total([float(w.sum()), float((x * w).sum()), float((x * x * w).sum())])
        if n <= 0:
            return
        mean = total / n
        var = max(squares / n - mean ** 2, 0.0)
        count, new = float(self.count), float(self.count) + n
        delta = mean - float(self.mean)
        self.var.fill_((count * float(self.var) + n * var + delta ** 2 * count * n / new) / new)
        self.mean.fill_(float(self.mean) + delta * n / new)
        self.count.fill_(new)

    def stats(self):
        return self.mean, self.var.clamp_min(self.min_var).sqrt()

    def normalize(self, x: Tensor) -> Tensor:
        mean, std = self.stats()
        return ((x.double() - mean) / std).to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        mean, std = self.stats()
        return (x.double() * std + mean).to(x.dtype)


def orthogonal_init(net: nn.Module, out_gain: float) -> nn.Module:
    """MAPPO's initialisation of an MLP: orthogonal weights, gain sqrt(2) on the hidden layers and
    ``out_gain`` on the last (0.01 for a policy: near-uniform actions at the start; 1 for a value),
    zero biases."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        nn.init.orthogonal_(m.weight, gain=out_gain if i == len(linears) - 1 else math.sqrt(2))
        nn.init.zeros_(m.bias)
    return net


@dataclass
class BudgetController:
    """PI control of a non-negative cost weight toward a GMACs budget (RL4EViT's alpha, PRANCE's
    cost weight): after each batch, with e = GMACs ratio - budget, ``integral += ki * e`` and
    ``weight = integral + kp * e`` (the PID Lagrangian of Stooke et al., 2020: the proportional term
    answers at once, so the integral overshoots less than plain dual ascent). The weight is a cost,
    never a reward for compute: it is clamped at 0, and so is the integral (anti-windup: while the
    policy spends less than the budget at weight 0, the integral does not pile up a debt that would
    hold the weight at 0 long after the policy has come back over the budget)."""

    budget: float
    ki: float
    kp: float
    integral: float = 0.0
    error: float = 0.0

    def __post_init__(self):
        self.integral = max(self.integral, 0.0)

    @property
    def cost_weight(self) -> float:
        return max(self.integral + self.kp * self.error, 0.0)

    def update(self, ratio: float) -> float:
        """Take the latest GMACs ratio; returns the cost weight for the next batch."""
        self.error = ratio - self.budget
        self.integral = max(self.integral + self.ki * self.error, 0.0)
        return self.cost_weight


def calibrate(ratio_at: Callable[[float], float], ratio: float, budget: float, tolerance: float,
              span: float = 8.0, iters: int = 12, max_span: float = 64.0) -> tuple:
    """Bisection for the shift s of a policy's output (PRANCE: before the sigmoid; RL4EViT: the keep
    logit) whose greedy GMACs ratio ``ratio_at(s)`` is nearest the budget; ``ratio`` is the one at
    s = 0. Every action grows with s, so the ratio does too (on average over images: later decisions
    see other features). The bracket is [0, span] on the side toward the budget, doubled up to
    ``max_span`` while the budget lies beyond it (a confident policy's outputs can sit further out
    than ``span``). Stops within half the tolerance. Returns (s, its ratio); s = 0 when nothing got
    nearer."""
    best = (0.0, ratio)

    def seen(s: float) -> float:
        nonlocal best
        r = ratio_at(s)
        if abs(r - budget) < abs(best[1] - budget):
            best = (s, r)
        return r

    if abs(ratio / budget - 1) <= tolerance / 2:
        return best
    up = ratio < budget  # the ratio must grow: a positive shift
    sign, lo, hi = (1.0 if up else -1.0), 0.0, span
    while (seen(sign * hi) < budget) == up and hi < max_span:  # the budget lies beyond the bracket
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        if abs(best[1] / budget - 1) <= tolerance / 2:
            break
        mid = (lo + hi) / 2
        if (seen(sign * mid) < budget) == up:
            lo = mid
        else:
            hi = mid
    return best
