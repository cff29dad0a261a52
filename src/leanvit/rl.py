"""PPO pieces shared by RL4EViT (one agent per token) and PRANCE (one agent per image).

Written out rather than taken from torchrl: torchrl's PPO losses expect TensorDict-wrapped
actor/critic modules and a fixed time axis, while here a trajectory is a few decision layers
whose agents (tokens) change from step to step. The GAE below is checked against torchrl's
functional ``generalized_advantage_estimate`` in the tests when torchrl is installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .options import arg, positive, positive_int, unit


@dataclass
class PPOConfig:
    """Hyperparameters with the RL4EViT paper's defaults (MAPPO's where the paper defers to it)."""

    clip: float = arg(0.2, positive)  # epsilon of the clipped surrogate and of the clipped value loss
    gamma: float = arg(0.99, unit)  # discount over the decision steps
    lam: float = arg(0.95, unit)  # GAE lambda
    epochs: int = arg(15, positive_int, "K PPO iterations per batch", flag="--ppo-epochs")
    lr_actor: float = arg(5e-5, positive)
    lr_critic: float = arg(5e-5, positive)
    value_coef: float = 1.0
    entropy_coef: float = 0.0
    max_grad_norm: float = 10.0


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
