"""Training RL4EViT's agents by multi-agent PPO (the paper's Algorithm 1), on the PPO trainer
of :mod:`leanvit.ppo`: what is RL4EViT's own is here, its rollout, its rewards and its agents.

Each batch is one rollout: the ViT runs masked (pruned tokens stay in place, marked invalid) with
actions sampled from the shared actor at the pruning layers; every agent's rewards follow
equations 1-2; GAE runs along each agent's own trajectory over the pruning layers (an agent's
episode ends when it prunes its token, or at the last layer); then K PPO iterations update the
actor (clipped surrogate) and the critic (clipped value loss). Odd epochs train the agents with the
ViT frozen; with ``finetune_vit`` even epochs fine-tune the ViT with the agents frozen (greedy).

MAPPO's settings by default: an entropy bonus of 0.01, value normalisation (:class:`~leanvit.rl.ValueNorm`)
and orthogonal initialisation of the actor and critic (``init="default"``, ``value_norm=False``
and ``entropy_coef=0`` turn them off). ``reward`` picks the accuracy signal γ of r2:
``correct`` (the paper's, 0/1), ``agreement`` (the reduced prediction equals the dense model's) or
``kl`` (exp(-KL(dense || reduced)) per image), the last two from a no-grad dense forward of the same
batch. With ``budget`` alpha is the trainer's controlled cost weight and the keep logit is what
the calibration shifts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .methods.rl4evit import R2_TO, agent_rewards
from .options import arg, fraction, nonnegative, one_of, positive, positive_int
from .ppo import Policy, PolicyRun, PolicyTask, Rollout, train_ppo
from .rl import PPOConfig, orthogonal_init
from .runtime import adapt
from .training import average_gradients, export_weights


REWARDS = ("correct", "agreement", "kl")


@dataclass(kw_only=True)
class PolicyConfig(PolicyRun):
    alpha: Optional[float] = arg(None, nonnegative, (  # default 0.8, or 0.03 (start) with a budget
        "weight of r1 (-1 per kept token): default 0.8 (the paper's); with --budget the starting value, "
        "default 0.03"))
    beta: float = arg(1.0, nonnegative, "weight of r2 (accuracy signal / tokens kept)")
    r2_to: str = arg("kept", one_of(*R2_TO), (
        "who earns r2: kept (the agents that kept their token: the paper's and the authors' code) or alive "
        "(every agent that acted: then keeping and pruning earn the same r2)"))
    reward: str = arg("correct", one_of(*REWARDS), (
        "accuracy signal of r2: correct (the paper's: 0/1 right), agreement (0/1 the same prediction as "
        "the dense model), kl (exp(-KL(dense || reduced)) per image)"))
    budget: Optional[float] = arg(None, fraction, (
        "target mean GMACs (actor included) as a fraction of dense: alpha is PI-controlled toward it, "
        "then the keep logit is calibrated on the evaluation images"))
    budget_tolerance: float = arg(0.05, positive, "relative: how near the budget calibration must bring the policy")
    dual_lr: float = arg(0.003, nonnegative, "integral gain: alpha step per unit of GMACs-ratio excess, per batch")
    dual_p: float = arg(0.03, nonnegative, "proportional gain on the same excess")
    calibrate: bool = arg(True, help="with --budget: do not shift the final policy's keep logit to meet the budget")
    value_norm: bool = arg(True, help="no value normalisation (MAPPO's ValueNorm of the returns)")
    init: str = arg("orthogonal", one_of("orthogonal", "default"), "actor/critic initialisation: orthogonal (MAPPO's) or default (PyTorch's)")
    epochs: int = arg(2, positive_int)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    finetune_vit: bool = arg(False, help="even epochs fine-tune the ViT, agents frozen")
    lr_vit: float = arg(1e-5, positive)


def accuracy_signal(kind: str, logits, labels, dense_logits=None):
    """(B,) the reward's γ per image: 0/1 correct, 0/1 agreement with the dense prediction, or
    exp(-KL(dense || reduced)) in (0, 1]."""
    if kind == "correct":
        return (logits.argmax(1) == labels).float()
    if kind == "agreement":
        return (logits.argmax(1) == dense_logits.argmax(1)).float()
    dense_logp, logp = F.log_softmax(dense_logits.float(), dim=1), F.log_softmax(logits.float(), dim=1)
    return torch.exp(-(dense_logp.exp() * (dense_logp - logp)).sum(1).clamp_min(0))


class TokenAgents:
    """RL4EViT's agents as PPO reads them. Multi-agent: every token is an agent with its own
    reward, value and advantage; its episode ends when it prunes its token. Single-agent (the
    ablation): one agent per image takes the joint action of a layer (log-probability = sum over
    the tokens), with the layer's summed reward and one value from [mean token ; CLS]; its episode
    is the image."""

    def __init__(self, method):
        self.method, self.single = method, method.agents == "single"

    def actor_parameters(self):
        return list(self.method.actor.parameters())

    def critic_parameters(self):
        return list(self.method.critic.parameters())

    def trajectories(self, steps: dict, rewards: torch.Tensor) -> Rollout:
        """The rollout of ``steps`` (the method's recorded steps stacked, (T, B, P) each) rewarded
        by ``rewards`` (T, B, P)."""
        alive = steps["alive"]
        if self.single:
            dones = torch.zeros(rewards.shape[:2], dtype=torch.bool, device=rewards.device)
            dones[-1] = True
            return Rollout((rewards * alive).sum(dim=2), (steps["logp"] * alive).sum(dim=2), dones, steps)
        dones = (~steps["kept"]) | ~alive
        dones[-1] = True
        return Rollout(rewards, steps["logp"], dones, steps, weight=alive.float())

    def policy(self, ro: Rollout) -> Policy:
        dist = torch.distributions.Categorical(logits=self.method.actor(ro.inputs["tokens"]))
        alive = ro.inputs["alive"].float()
        logp = dist.log_prob(ro.inputs["action"])
        entropy = (dist.entropy() * alive).sum() / alive.sum().clamp_min(1)
        return Policy((logp * alive).sum(dim=2) if self.single else logp, entropy)

    def values(self, ro: Rollout) -> torch.Tensor:
        tokens, cls = ro.inputs["tokens"].flatten(0, 1), ro.inputs["cls"].flatten(0, 1)
        if self.single:
            return self.method.pooled_value(tokens, cls, ro.inputs["alive"].flatten(0, 1)).view(ro.rewards.shape)
        return self.method.value(tokens, cls).view_as(ro.rewards)


class AgentsTraining(PolicyTask):
    """RL4EViT's part of the PPO trainer: sampled masked rollouts rewarded by equations 1-2, alpha
    as the cost weight, the keep logit as what calibration shifts; with ``finetune_vit`` the even
    epochs fine-tune the ViT under the greedy agents."""

    command, cost_name, default_cost = "train-policy", "alpha", (0.8, 0.03)
    weights_key, weights_file = "model", "policy.safetensors"
    # a young actor's keep margins (MAPPO's init: output gain 0.01) are narrow: 20 halvings of [-8, 8]
    calibration_iters = 20

    def __init__(self, cfg: PolicyConfig, model, dense, world: int):
        self.cfg, self.model, self.dense, self.world = cfg, model, dense, world
        self.runner = adapt(model, "rl4evit", **cfg.options)
        method = self.runner.method
        if cfg.init == "orthogonal" and not method.weights:  # not over given weights; a resume loads its own
            orthogonal_init(method.actor, 0.01)
            orthogonal_init(method.critic, 1.0)
        self.agents = TokenAgents(method)
        self.opt_vit = torch.optim.AdamW(model.parameters(), lr=cfg.lr_vit, weight_decay=0.05)

    def rollout(self, batch, alpha: float):
        runner, method, cfg = self.runner, self.runner.method, self.cfg
        runner.eval()  # the ViT is frozen: no dropout, no gradients
        runner.masked, method.sampling = True, True
        with torch.no_grad():
            logits = runner(batch.images)
            dense_logits = self.dense(batch.images) if cfg.reward != "correct" else None
        signal = accuracy_signal(cfg.reward, logits, batch.labels, dense_logits)
        steps = {k: torch.stack([step[k] for step in method.rollout])
                 for k in ("tokens", "cls", "action", "logp", "alive", "kept")}
        rewards = agent_rewards(steps["kept"], steps["alive"], signal, alpha, cfg.beta, cfg.r2_to)
        alive = steps["alive"].float()
        logged = dict(reward=float(rewards.sum((0, 2)).mean()),
                      keep=float((steps["kept"].float() * alive).sum() / alive.sum()),
                      acc=float((logits.argmax(1) == batch.labels).float().mean()), signal=float(signal.mean()))
        return self.agents.trajectories(steps, rewards), logged

    def output_bias(self):
        return self.runner.method.actor[-1].bias, 1  # the keep logit: every agent keeps more as it grows

    def trains_agents(self, epoch: int) -> bool:
        return epoch % 2 == 0 or not self.cfg.finetune_vit  # the paper's odd (1-based) epochs

    def other_step(self, batch) -> dict:
        """Fine-tune the ViT on cross-entropy under the greedy agents (frozen)."""
        runner, method = self.runner, self.runner.method
        runner.train()
        runner.masked, method.sampling = True, False
        method.requires_grad_(False)
        logits = runner(batch.images)
        loss = F.cross_entropy(logits, batch.labels)
        self.opt_vit.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model.parameters(), self.world)
        self.opt_vit.step()
        method.requires_grad_(True)
        return dict(reward=0.0, keep=0.0, acc=float((logits.argmax(1) == batch.labels).float().mean()),
                    ce=f"{loss.item():.3f}")  # no rollout

    def optimizers(self) -> dict:
        return dict(opt_vit=self.opt_vit)

    def trained(self):
        return self.runner  # the agents, and the ViT when it is fine-tuned

    def replicas(self):
        return self.runner if self.cfg.finetune_vit else self.runner.method

    def export(self, out) -> None:
        super().export(out)
        if self.cfg.finetune_vit:
            export_weights(self.model, out / "vit.safetensors")


def train_policy(cfg: PolicyConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) RL4EViT's agents; exports ``out/policy.safetensors`` (and
    ``out/vit.safetensors`` with ``finetune_vit``)."""
    return train_ppo(cfg, AgentsTraining, log)
