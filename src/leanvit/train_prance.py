"""PRANCE training: the channel-elastic meta-network, then the selector.

Meta-network (``leanvit train-supernet``: ``leanvit train`` with :class:`MetaNetwork`): heads
and MLP neurons are first reordered by importance, then every step trains the largest
sub-network on the labels and the smallest plus random ones on the largest's predictions
(weight sharing: all widths are first-k slices of the same weights).

Selector (``leanvit train-selector``, on the PPO trainer of :mod:`leanvit.ppo`, which holds the
budget control and calibration described here): PPO over the stage decisions of each image with the ViT
frozen, rewarded by Result-to-Go: after each decision the network is finished at full width from
there, and the step's reward is that result, ``acc - cost_weight * (GMACs ratio + token_weight *
kept ratio)``, with acc = 0 only when the dense network is right and the finished one wrong. The
token cost is relative to the GMACs cost (the authors' 0.1 per kept ratio against about 0.37 for
DeiT-S's GMACs gives 0.25), so that one weight moves the whole cost and the budget control over it
reaches from "keep everything" (weight 0) to "keep the least".
With ``budget`` the cost weight is a Lagrange multiplier for the constraint "mean GMACs =
budget x dense", moved after every PPO batch by a PI controller on the error e = ratio - budget
(ratio: the greedy selector's GMACs ratio on that batch, averaged over processes):
``integral += dual_lr * e``; ``cost_weight = integral + dual_p * e`` (the PID Lagrangian of Stooke
et al., 2020: the proportional term answers at once, so the integral overshoots less than plain
dual ascent; :class:`leanvit.rl.BudgetController`). The weight never goes below 0 (nor its
integral): compute is never rewarded; a budget above what the selector spends at weight 0 is met
by the calibration below. (Bisection over the weight with short trainings was tried first; on the reference
model accuracy barely depends on the choices, so the weight-to-GMACs map is flat and noisy below
some weight and budgets above the starting point were out of reach.) With ``max_epochs``, training
goes on an epoch at a time while the selector's GMACs ratio on the evaluation images is not within
``budget_tolerance`` of the budget. The controller keeps the *training* average near the budget, but
the policy swings around it (Adam moves it at a constant speed), so the final greedy selector can
end outside the tolerance. Then it is calibrated (``calibrate``, on by default): a shift of the
actor's output before the sigmoid moves every action the same way (wider stages, more tokens), and
bisection over that shift on the evaluation images brings the mean GMACs to the budget.

PPO as the authors (and MAPPO) run it where it is known to matter: an entropy bonus of 0.01
(``ppo.entropy_coef``), and optionally the critic on normalised returns (``value_norm``); K = 10 PPO
epochs per batch, as the authors (10 measured closer to dense than 4 in each of 3 seeds, BENCHMARKS
"PRANCE selector settings"). ``option_entropy`` adds option-count regularisation
(:func:`choice_marginal_entropy`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .evaluate import kl_per_image
from .methods.prance import SELECTOR_STATES
from .options import arg, nonnegative, one_of, positive, positive_int
from .ppo import Policy, PolicyRun, PolicyTask, Rollout, train_ppo
from .rl import PPOConfig
from .runtime import adapt
from .training import Supervised, distill_loss, evaluate_top1


# --- the meta-network ---------------------------------------------------------------------------
SUPERNET = dict(method="prance", sandwich=2)  # what `leanvit train-supernet` sets on a TrainConfig


class MetaNetwork(Supervised):
    """PRANCE in ``leanvit train``: the selector stays frozen (``train-selector`` trains it, or it is
    unused). With ``cfg.sandwich``, the meta-network's training: heads and neurons reordered by
    importance on a fresh start (``cfg.reorder``), :func:`sandwich_step` steps, and the
    sub-networks' top-1 (:func:`evaluate_subnetworks`), also before training."""

    def __init__(self, cfg):
        if cfg.method != "prance":
            raise ValueError(f"sandwich (meta-network) training needs method 'prance', got {cfg.method!r}")
        super().__init__(cfg)
        self.first = bool(cfg.sandwich)

    def adapt(self, model, fresh: bool):
        if self.cfg.sandwich and self.cfg.reorder and fresh:
            from .elastic import reorder_by_importance
            reorder_by_importance(model)  # so that the first k heads/neurons are the best k
        runner = super().adapt(model, fresh)
        runner.method.requires_grad_(False)  # the selector: train-selector trains it
        return runner

    def loss(self, net, runner, batch, teacher, step: int) -> Tensor:
        if not self.cfg.sandwich:
            return super().loss(net, runner, batch, teacher, step)
        return sandwich_step(net, runner.method, batch, self.cfg, teacher, step)

    def evaluate(self, runner, loader) -> dict:
        if not self.cfg.sandwich:
            return super().evaluate(runner, loader)
        return evaluate_subnetworks(runner, loader)


def sandwich_step(net, method, batch, cfg, teacher, step: int) -> Tensor:
    """Backward the largest sub-network (labels, and the teacher if distilling), then the smallest
    and ``cfg.sandwich - 1`` random ones (KL to the largest's predictions). Returns the summed loss.
    The random ones' heads and MLP widths are drawn per stage (``cfg.sandwich_widths``
    'per-stage'), since the selector mixes widths across stages, or shared by all stages ('uniform')."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same sub-networks on resume
    method.fixed = method.subnetwork("largest")
    logits = net(batch.images)
    loss = F.cross_entropy(logits, batch.labels, label_smoothing=cfg.label_smoothing)
    if teacher is not None:
        loss = loss + cfg.distill * distill_loss(logits, teacher, batch.images)
    loss.backward()
    target = F.log_softmax(logits.detach(), dim=-1)
    total = loss.detach()
    for i in range(cfg.sandwich):
        method.fixed = method.subnetwork("smallest") if i == 0 else method.random_subnetwork(
            gen, per_stage=cfg.sandwich_widths == "per-stage")
        sub = F.kl_div(F.log_softmax(net(batch.images), dim=-1), target, reduction="batchmean", log_target=True)
        sub.backward()
        total = total + sub.detach()
    method.fixed = method.subnetwork("largest")
    return total


def evaluate_subnetworks(runner, loader) -> dict:
    """Top-1 of the largest, middle and smallest sub-networks (all tokens kept)."""
    method, saved = runner.method, runner.method.fixed
    out = {}
    for which, key in (("largest", "top1"), ("middle", "top1_middle"), ("smallest", "top1_smallest")):
        method.fixed = method.subnetwork(which)
        out[key] = evaluate_top1(runner, loader)
    method.fixed = saved
    return out


# --- the selector -------------------------------------------------------------------------------
SELECTOR_REWARDS = ("correct", "kl")


@dataclass(kw_only=True)
class SelectorConfig(PolicyRun):
    """``checkpoint``: the meta-network's weights (from train-supernet); ``options``: prance's."""

    cost_weight: Optional[float] = arg(None, nonnegative, (  # default 0.5, or 0 (start) with a budget
        "reward cost per unit of GMACs ratio (default 0.5; with --budget, the starting value, default 0)"))
    token_weight: float = arg(0.25, nonnegative, "cost of the kept-token ratio, relative to the GMACs ratio's")
    reward: str = arg("correct", one_of(*SELECTOR_REWARDS), (
        "accuracy term of the Result-to-Go reward: correct (the authors': 0 only when dense is right and the "
        "finished network wrong) or kl (exp(-KL(dense || finished network)), the fidelity to dense)"))
    # target mean GMACs as a fraction of dense (PI control of cost_weight); the command line takes several
    budget: Optional[float] = None
    budget_tolerance: float = arg(0.05, positive, "relative (default 5%): the final selector is reported as "
                                  "within it or not")  # else max_epochs trains on
    dual_lr: float = arg(0.02, nonnegative, "integral gain: cost-weight step per unit of GMACs-ratio excess over "
                         "the budget, per batch")
    dual_p: float = arg(0.1, nonnegative, "proportional gain on the same excess")
    # with a budget still not met at the end: shift the actor's output to meet it
    calibrate: bool = arg(True, help="with --budget: do not shift the final selector's actions to meet a missed "
                          "budget")
    epochs: int = arg(1, positive_int)
    # K = 10 PPO epochs by default (--ppo-epochs), the authors'; their entropy bonus of 0.01 (PPOConfig's)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(gamma=0.9, lam=0.9, epochs=10, lr_actor=1e-4,
                                                             lr_critic=5e-3))
    value_norm: bool = arg(False, help="normalise the critic's targets by the running mean and standard "
                           "deviation of the returns seen so far (MAPPO's value normalisation)")
    option_entropy: float = arg(0.0, nonnegative, (
        "option-count regularisation: weight, in the actor's loss, of the entropy of the batch's marginal "
        "distribution of each stage's discrete choices (heads, MLP width, keep ratio: the probability each "
        "image's action distribution gives each option, averaged over the batch; mean over stages and "
        "action dimensions, in nats). Lowering it makes the images of a batch share choices: fewer distinct "
        "configurations (fewer width groups and token counts in packed execution, hence faster). 0 "
        "(default): off"))
    # the selector's state (prance's option 'state'): [CLS ; mean patch ; ...] or the keys' mean
    state: Optional[str] = arg(None, one_of(*SELECTOR_STATES), (
        "the selector's view of the tokens before a stage (prance option state=): 'summary' [CLS ; mean patch "
        "; stage ; patches left] (default), or 'keys' [per-token mean of the last block's attention keys ; "
        "stage ; patches left] (the authors' state, plus the stage and count)"))


def stage_rewards(correct: Tensor, dense_correct: Tensor, macs_ratio: Tensor, kept: Tensor,
                  cost_weight: float, token_weight: float, fidelity: Optional[Tensor] = None) -> Tensor:
    """Result-to-Go rewards (T, B): for each decision, the network finished from there.

    correct: (T, B) whether the finished network is right; dense_correct: (B,); macs_ratio,
    kept: (T, B) its block MACs over dense and its kept-token ratio. The accuracy term is the
    authors' (0 only when dense is right and the finished network wrong), or ``fidelity`` (T, B)
    when given: exp(-KL(dense || finished network)), 1 when it gives the dense output."""
    acc = 1.0 - (dense_correct[None] & ~correct).float() if fidelity is None else fidelity
    return acc - cost_weight * (macs_ratio + token_weight * kept)


def rollout_tensors(rollout: List[dict], batch: int, stages: int, dense_macs: float, labels: Tensor,
                    dense_logits: Optional[Tensor] = None) -> dict:
    """The per-group rollout steps of one forward as (T, B, ...) tensors, T = stages - 1; with
    ``dense_logits`` also ``fidelity``: exp(-KL(dense || the network finished after each step))."""
    first, dev = rollout[0], labels.device
    T = stages - 1
    out = dict(features=first["features"].new_zeros(T, batch, first["features"].shape[1]),
               actions=first["actions"].new_zeros(T, batch, first["actions"].shape[1]),
               logp=first["logp"].new_zeros(T, batch), correct=torch.zeros(T, batch, dtype=torch.bool, device=dev),
               macs_ratio=torch.zeros(T, batch, device=dev), kept=torch.zeros(T, batch, device=dev))
    for step in rollout:
        t, rows = step["stage"] - 1, step["rows"]
        for key in ("features", "actions", "logp"):
            out[key][t, rows] = step[key]
        out["correct"][t, rows] = step["logits"].argmax(dim=1) == labels[rows]
        if dense_logits is not None:
            out.setdefault("fidelity", torch.zeros(T, batch, device=dev))
            out["fidelity"][t, rows] = torch.exp(-kl_per_image(dense_logits[rows], step["logits"]).float())
        # MACs and kept ratios are counted on the host
        out["macs_ratio"][t, rows] = torch.as_tensor(step["block_macs"] / dense_macs, dtype=torch.float32).to(dev)
        out["kept"][t, rows] = torch.as_tensor(step["kept"], dtype=torch.float32).to(dev)
    return out


def choice_marginal_entropy(dist: torch.distributions.Normal, bins: Tuple[int, ...]) -> Tensor:
    """Mean over the decision steps and action dimensions of the entropy (nats) of the batch's
    marginal distribution of the discrete choice: action a in dimension j picks option
    floor(a * bins[j]) (clamped into range, as ``Prance.to_choices``), so image i picks option o with
    probability P_io = Phi((o+1)/n) - Phi(o/n) under its Gaussian (the end options take the tails);
    the marginal is P averaged over the batch. loc, scale: (..., B, A)."""
    out = []
    for j, n in enumerate(bins):
        mean, std = dist.loc[..., j], dist.scale[..., j]
        edges = torch.arange(1, n, device=mean.device, dtype=mean.dtype) / n
        cdf = torch.special.ndtr((edges - mean[..., None]) / std[..., None])  # (..., B, n - 1)
        cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], dim=-1)
        marginal = (cdf[..., 1:] - cdf[..., :-1]).mean(dim=-2)  # (..., n): over the batch
        out.append(-(marginal * marginal.clamp_min(1e-12).log()).sum(-1).mean())
    return torch.stack(out).mean()


class SelectorAgents:
    """PRANCE's selector as PPO reads it: one agent per image, its Gaussian actions over the stage
    decisions; with ``option_entropy`` the actor's loss adds that times
    :func:`choice_marginal_entropy` over the action dimensions' ``bins``."""

    def __init__(self, selector, bins: Tuple[int, ...] = (), option_entropy: float = 0.0):
        self.selector, self.bins, self.option_entropy = selector, bins, option_entropy

    def actor_parameters(self):
        return [*self.selector.actor.parameters(), self.selector.log_std]

    def critic_parameters(self):
        return list(self.selector.critic.parameters())

    @staticmethod
    def trajectories(ro: dict, rewards: Tensor) -> Rollout:
        """The rollout of :func:`rollout_tensors`' ``ro`` rewarded by ``rewards`` (T, B): an image's
        episode is its decisions."""
        dones = torch.zeros_like(rewards, dtype=torch.bool)
        dones[-1] = True
        return Rollout(rewards, ro["logp"], dones, ro)

    def policy(self, ro: Rollout) -> Policy:
        dist = self.selector.distribution(ro.inputs["features"])
        logp, entropy = dist.log_prob(ro.inputs["actions"]).sum(-1), dist.entropy().sum(-1).mean()
        if not self.option_entropy:
            return Policy(logp, entropy)
        spread = choice_marginal_entropy(dist, self.bins)
        return Policy(logp, entropy, self.option_entropy * spread, dict(option_entropy=spread))

    def values(self, ro: Rollout) -> Tensor:
        return self.selector.value(ro.inputs["features"])


class SelectorTraining(PolicyTask):
    """PRANCE's part of the PPO trainer: sampled rollouts rewarded by Result-to-Go, the cost weight
    as the controlled one, the selector's output before the sigmoid as what calibration shifts."""

    command, cost_name, default_cost = "train-selector", "cost_weight", (0.5, 0.0)
    weights_key, weights_file = "selector", "selector.safetensors"

    @classmethod
    def method_options(cls, cfg: SelectorConfig) -> dict:
        options = dict(cfg.options)
        if cfg.state is not None and options.setdefault("state", cfg.state) != cfg.state:
            raise ValueError(f"--state {cfg.state} and --opt state={options['state']} disagree; give one")
        return options

    def __init__(self, cfg: SelectorConfig, model, dense, world: int):
        self.cfg, self.dense = cfg, dense
        self.runner = adapt(model.eval(), "prance", **self.method_options(cfg))
        method = self.runner.method
        if method.fixed is not None:
            raise ValueError("train-selector trains the selector; do not pass the 'subnet' option")
        self.agents = SelectorAgents(method.selector, method.action_bins(), cfg.option_entropy)
        self.dense_macs = method.dense_block_macs(self.runner)

    def rollout(self, batch, cost_weight: float):
        method, cfg = self.runner.method, self.cfg
        method.sampling = True
        with torch.no_grad():
            dense_logits = self.dense(batch.images)
            self.runner(batch.images)
        ro = rollout_tensors(method.rollout, batch.images.shape[0], method.n_stages, self.dense_macs, batch.labels,
                             dense_logits if cfg.reward == "kl" else None)
        rewards = stage_rewards(ro["correct"], dense_logits.argmax(1) == batch.labels, ro["macs_ratio"], ro["kept"],
                                cost_weight, cfg.token_weight, ro.get("fidelity"))
        logged = dict(reward=float(rewards.sum(0).mean()), keep=float(ro["kept"][-1].mean()),
                      acc=float(ro["correct"][-1].float().mean()), macs_ratio=float(ro["macs_ratio"][-1].mean()))
        return self.agents.trajectories(ro, rewards), logged

    def output_bias(self):
        return self.runner.method.selector.actor[-1].bias, slice(None)  # every action: wider stages, more tokens


def train_selector(cfg: SelectorConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one selector; exports ``out/selector.safetensors``. With ``cfg.budget`` the
    cost weight is PI-controlled toward it (see the module doc)."""
    return train_ppo(cfg, SelectorTraining, log)
