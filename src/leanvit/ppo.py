"""One PPO trainer for the learned decision networks: RL4EViT's agents and PRANCE's selector.

A method's training supplies only what is its own, a :class:`PolicyTask`: the runner it trains,
one rollout of a batch with its rewards (a :class:`Rollout`), and its actor and critic as PPO
reads them (:class:`Agents`). Everything else is here, the same for both:

- :func:`ppo_update`: GAE along every agent's trajectory, then K iterations of the clipped
  surrogate with the entropy bonus and of the clipped value loss (optionally on normalised
  returns, :class:`~leanvit.rl.ValueNorm`), the gradients averaged over the processes;
- the budget: with ``budget`` the reward's cost weight is PI-controlled toward it
  (:class:`~leanvit.rl.BudgetController`) on the greedy policy's GMACs ratio of each batch, its
  decision networks included; with ``max_epochs`` training goes on an epoch at a time while the
  held-out ratio misses it; then the actor's output is shifted (:func:`~leanvit.rl.calibrate`)
  until the greedy policy meets it within ``budget_tolerance`` on the held-out images;
- held-out evaluation through :func:`~leanvit.evaluate.evaluate`: top-1, GMACs (and of them the
  decision networks'), agreement and KL to the dense model, distinct configurations per 32 images;
- the resumable run (:mod:`leanvit.training`): checkpoint and restore, progress, ``metrics.json``
  with every batch's reward, kept fraction, cost weight and GMACs ratio (``curve``), and a plot
  of them (``curves.png``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .data import DATA_HELP
from .evaluate import evaluate
from .measure import count_macs, macs_per_image
from .methods.base import file_metadata
from .options import arg, check_fields, natural, path, positive_int
from .rl import BudgetController, PPOConfig, ValueNorm, calibrate, clipped_policy_loss, clipped_value_loss, gae
from .runtime import adapt
from .training import EVAL_SPLIT_HELP, HOLDOUT, Run, all_sum, average_gradients, export_weights, fit

CONFIGURATION_GROUP = 32  # images per group when counting distinct configurations (a packed batch's)


@dataclass(kw_only=True)
class PolicyRun:
    """What every policy training (RL4EViT's agents, PRANCE's selector) is given besides its own
    hyperparameters: the model, data, and the resumable run's options. Each
    :func:`~leanvit.options.arg` field is a command-line option of the same name, checked the
    same way when the configuration is made in Python."""

    model: str
    out: str = arg(check=path)
    checkpoint: Optional[str] = None  # the ViT's weights
    pretrained: bool = False
    data: Optional[str] = arg(None, path, DATA_HELP)
    options: dict = field(default_factory=dict)  # the method's options
    batch_size: int = arg(64, positive_int, "images per PPO batch, over all processes")
    seed: int = arg(0, natural)
    workers: int = arg(1, natural)
    save_every: int = arg(50, positive_int)
    train_split: str = "train"
    eval_split: str = arg(HOLDOUT, help=EVAL_SPLIT_HELP)  # selection, calibration, budgets: never test images
    limit_train: Optional[int] = arg(None, positive_int)
    limit_eval: Optional[int] = arg(None, positive_int)
    max_steps: Optional[int] = arg(None, positive_int)
    max_epochs: Optional[int] = arg(None, positive_int, "with --budget: while the budget is not met after --epochs, "
                                    "train on an epoch at a time, up to this many (default: --epochs)")
    budget: Optional[float] = None  # target mean GMACs as a fraction of dense
    device: Optional[str] = None  # --device (leanvit.device.select_device; None: cuda when available)
    amp: str = "off"  # --amp: off or bf16 autocast

    def __post_init__(self):
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and 0 < self.budget <= 1):
            raise ValueError(f"budget must be a fraction of the dense GMACs in (0, 1], got {self.budget}")
        check_fields(self)


def meets_budget(ratio: float, cfg) -> bool:
    """Within ``cfg.budget_tolerance`` (relative) of ``cfg.budget``."""
    return abs(ratio / cfg.budget - 1) <= cfg.budget_tolerance


# --- PPO ---------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """One batch's decisions as PPO reads them: (T, ...) tensors over T decision steps, one entry
    per agent (a token, an image)."""

    rewards: Tensor
    logp: Tensor  # the log-probability of the action each agent took
    dones: Tensor  # bool: the agent's episode ends after this step
    inputs: dict  # what the method's actor and critic read again (tokens, features, the actions)
    weight: Optional[Tensor] = None  # 1 where an agent acted, 0 where not (None: everywhere)


class Policy(NamedTuple):
    """The current actor on a rollout: the log-probabilities of its actions (shaped as its
    rewards), the mean entropy of the action distributions, and an optional term added to the
    actor's loss, with what to log of it."""

    logp: Tensor
    entropy: Tensor
    penalty: Optional[Tensor] = None
    logged: Optional[Dict[str, Tensor]] = None


class Agents(Protocol):
    """A method's actor and critic as :func:`ppo_update` uses them."""

    def actor_parameters(self) -> List[Tensor]: ...

    def critic_parameters(self) -> List[Tensor]: ...

    def policy(self, ro: Rollout) -> Policy: ...

    def values(self, ro: Rollout) -> Tensor:  # shaped as ro.rewards (normalised with a ValueNorm)
        ...


def ppo_update(agents: Agents, ro: Rollout, cfg: PPOConfig, opt_actor, opt_critic, world: int = 1,
               value_norm: Optional[ValueNorm] = None) -> dict:
    """K iterations of PPO on one rollout; returns the last losses. With ``value_norm`` the critic
    predicts normalised returns (MAPPO): GAE reads its outputs denormalised, and its targets are
    the normalised returns (after the normaliser has seen them)."""
    weight = torch.ones_like(ro.rewards) if ro.weight is None else ro.weight
    with torch.no_grad():
        values_old = agents.values(ro)
        raw = values_old if value_norm is None else value_norm.denormalize(values_old)
        adv, returns = gae(ro.rewards, raw, ro.dones, gamma=cfg.gamma, lam=cfg.lam)
        if value_norm is not None:
            value_norm.update(returns, weight)
            returns = value_norm.normalize(returns)
        n = weight.sum().clamp_min(1)
        mean = (adv * weight).sum() / n
        adv = (adv - mean) / (((adv - mean) ** 2) * weight).sum().div(n).sqrt().clamp_min(1e-6)
    for _ in range(cfg.epochs):
        policy = agents.policy(ro)
        pol = clipped_policy_loss(policy.logp, ro.logp, adv, cfg.clip, weight=ro.weight)
        loss = pol - cfg.entropy_coef * policy.entropy
        _descend(opt_actor, loss if policy.penalty is None else loss + policy.penalty, agents.actor_parameters(),
                 world, cfg.max_grad_norm)
        vloss = cfg.value_coef * clipped_value_loss(agents.values(ro), values_old, returns, cfg.clip, weight=ro.weight)
        _descend(opt_critic, vloss, agents.critic_parameters(), world, cfg.max_grad_norm)
    return dict(policy_loss=pol.item(), value_loss=vloss.item(), entropy=policy.entropy.item(),
                **{k: v.item() for k, v in (policy.logged or {}).items()})


def _descend(optimizer, loss: Tensor, parameters: List[Tensor], world: int, max_grad_norm: float) -> None:
    """One optimizer step on ``loss``, the gradients averaged over the processes and clipped."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(parameters, world)
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


# --- what a method supplies ----------------------------------------------------------------------
class PolicyTask(ABC):
    """A method's part of a PPO training: the runner, the rollout and its rewards, the agents.

    Subclasses set the class attributes, build ``self.runner`` and ``self.agents`` in
    ``__init__(cfg, model, dense, world)`` and give :meth:`rollout` and :meth:`output_bias`; the
    other methods have defaults."""

    command: str  # the command line's, for the progress bar and the plot's title
    cost_name: str  # the reward's cost weight: its name in the history, checkpoint and metrics
    default_cost: Tuple[float, float]  # the cost weight without a budget, and the controller's start with one
    weights_key: str  # the trained weights' key in the checkpoint
    weights_file: str  # what the training exports, with the method's options in its metadata
    calibration_iters: int = 12  # bisection steps of the calibration
    runner = agents = None

    @classmethod
    def method_options(cls, cfg) -> dict:
        """The method's options (checked before anything is loaded)."""
        return dict(cfg.options)

    @abstractmethod
    def rollout(self, batch, cost_weight: float) -> Tuple[Rollout, dict]:
        """Sample the policy on ``batch``, reward it; returns the rollout and what to log: the mean
        ``reward`` per image, the ``keep`` fraction, the rollout's top-1 ``acc``, other numbers."""

    @abstractmethod
    def output_bias(self) -> Tuple[Tensor, object]:
        """The actor's output bias and the index of it that the calibration shifts: every action
        takes more compute as it grows."""

    def trains_agents(self, epoch: int) -> bool:
        return True

    def other_step(self, batch) -> dict:
        """A step of an epoch that does not train the agents (only a task whose ``trains_agents``
        says no to some epoch has them)."""
        raise TypeError(f"{type(self).__name__} trains its agents in every epoch: it has no other step")

    def greedy(self) -> None:
        """The runner as it is deployed: greedy decisions, tokens removed."""
        self.runner.masked, self.runner.method.sampling = False, False

    def optimizers(self) -> dict:
        """The method's optimizers besides the actor's and the critic's, by their checkpoint keys."""
        return {}

    def trained(self) -> torch.nn.Module:
        """What the checkpoint holds under ``weights_key``."""
        return self.runner.method

    def replicas(self) -> torch.nn.Module:
        """What every process must hold the same of at the end."""
        return self.runner.method

    def export(self, out) -> None:
        method = self.runner.method
        export_weights(method, out / self.weights_file, metadata=file_metadata(method))


def greedy_macs_ratio(runner, images, dense_gmacs: float) -> float:
    """The greedy policy's mean GMACs on ``images`` (its tokens removed, its decision networks
    counted) over the dense model's ``dense_gmacs`` (averaged over processes)."""
    method, masked = runner.method, runner.masked
    method.sampling, runner.masked = False, False
    try:
        with torch.no_grad(), runner.tracing() as trace:
            runner(images)
    finally:
        runner.masked = masked
    total, n = all_sum([float(macs_per_image(runner, trace, images).sum()), images.shape[0]])
    return total / n / 1e9 / dense_gmacs


# --- the trainer ---------------------------------------------------------------------------------
def train_ppo(cfg: PolicyRun, task: Callable[..., PolicyTask], log: Callable[[str], None] = print) -> dict:
    """Train (or resume) ``task``'s agents by PPO per ``cfg``; returns the metrics (also in
    ``out/metrics.json``)."""
    return PPOTrainer(cfg, task, log).train()


class PPOTrainer:
    """The training skeleton every :class:`PolicyTask` shares (see the module doc)."""

    def __init__(self, cfg: PolicyRun, task: Callable[..., PolicyTask], log: Callable[[str], None]):
        task.method_options(cfg)  # a bad option fails before any loading
        from .models import create_model  # at call time: tests replace models.create_model
        self.cfg, self.run = cfg, Run(cfg, log)
        model = create_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained).to(self.run.device)
        self.run.setup_data(model)
        self.dense = adapt(model, "none")  # the same (possibly fine-tuned) ViT, every token
        self.task = task(cfg, model, self.dense, self.run.world)
        self.runner, agents = self.task.runner, self.task.agents
        self.value_norm = ValueNorm(total=all_sum).to(self.run.device) if cfg.value_norm else None
        self.optimizers = dict(opt_actor=torch.optim.Adam(agents.actor_parameters(), lr=cfg.ppo.lr_actor),
                               opt_critic=torch.optim.Adam(agents.critic_parameters(), lr=cfg.ppo.lr_critic),
                               **self.task.optimizers())
        self.dense_gmacs = count_macs(self.dense, self.run.eval_set[0][0][None].to(self.run.device))
        given = getattr(cfg, self.task.cost_name)
        self.cost = given if given is not None else self.task.default_cost[cfg.budget is not None]
        self.control = BudgetController(cfg.budget, cfg.dual_lr, cfg.dual_p, integral=self.cost) \
            if cfg.budget is not None else None
        self.curve: List[dict] = []  # one record per batch

    def train(self) -> dict:
        fit(self.run, self.task.command, self.step, self.evaluate, self.state, self.restore, evaluate_at_stop=True,
            extend=self.extend)
        self.task.greedy()
        self.calibrate()
        return self.run.finish(self.metrics(), replicas=self.task.replicas(), export=self.export)

    # --- the checkpoint
    def state(self) -> dict:
        return {self.task.weights_key: self.task.trained().state_dict(),
                **{k: o.state_dict() for k, o in self.optimizers.items()},
                "value_norm": self.value_norm.state_dict() if self.value_norm is not None else None,
                self.task.cost_name: self.cost, "curve": list(self.curve),
                "control": asdict(self.control) if self.control is not None else None}

    def restore(self, ckpt: dict) -> None:
        self.task.trained().load_state_dict(ckpt[self.task.weights_key])
        for k, o in self.optimizers.items():
            o.load_state_dict(ckpt[k])
        if self.value_norm is not None and ckpt.get("value_norm"):
            self.value_norm.load_state_dict(ckpt["value_norm"])
        self.cost, self.curve[:] = ckpt[self.task.cost_name], ckpt.get("curve", [])
        if self.control is not None:
            self.control = BudgetController(**ckpt["control"])

    # --- one batch, one epoch
    def step(self, batch, i: int) -> dict:
        if not self.task.trains_agents(i // self.run.steps_per_epoch):
            return self.task.other_step(batch)
        ro, logged = self.task.rollout(batch, self.cost)
        used = self.cost
        losses = ppo_update(self.task.agents, ro, self.cfg.ppo, self.optimizers["opt_actor"],
                            self.optimizers["opt_critic"], self.run.world, self.value_norm)
        if self.control is not None:
            logged["greedy"] = greedy_macs_ratio(self.runner, batch.images, self.dense_gmacs)
            self.cost = self.control.update(logged["greedy"])
        self.curve.append(dict(step=i + 1, **{k: v for k, v in logged.items() if k != "greedy"},
                               **{self.task.cost_name: used},
                               **({"gmacs_ratio": logged["greedy"]} if "greedy" in logged else {})))
        return dict(logged, **{k: f"{v:.3f}" for k, v in losses.items()},
                    **({self.task.cost_name: f"{self.cost:.4f}"} if self.control is not None else {}))

    def evaluate(self, epoch: int, sums: dict, n: int) -> dict:
        """An epoch's history record: its rollouts' means, the cost weight, the held-out evaluation."""
        means = {k: v / n for k, v in sums.items()}
        record = dict(kind="agents" if self.task.trains_agents(epoch) else "vit", mean_reward=means.pop("reward"),
                      keep_ratio=means.pop("keep"), rollout_acc=100 * means.pop("acc"), **{self.task.cost_name: self.cost})
        if "greedy" in means:
            record["train_greedy_macs_ratio"] = means.pop("greedy")
        record.update({f"rollout_{k}": v for k, v in means.items()})
        return dict(record, **self.held_out())

    def held_out(self) -> dict:
        """The greedy policy on the held-out images against the dense model."""
        self.task.greedy()
        result = evaluate({"policy": self.runner, "dense": self.dense}, self.run.eval_loader, desc=None,
                          amp=self.run.amp, warmup=False, group=CONFIGURATION_GROUP)["policy"]
        return dict(top1=result.top1, gmacs=result.gmacs, gmacs_ratio=result.gmacs / self.dense_gmacs,
                    decision_gmacs=result.decision_gmacs, agreement=result.agreement, kl_to_dense=result.kl_to_dense,
                    **{f"configs_per_{CONFIGURATION_GROUP}": result.configurations})

    def held_out_ratio(self) -> float:
        """The greedy policy's GMACs ratio on the held-out images (no dense forward)."""
        self.task.greedy()
        result = evaluate({"policy": self.runner}, self.run.eval_loader, desc=None, reference=None, amp=self.run.amp,
                          warmup=False)["policy"]
        return result.gmacs / self.dense_gmacs

    # --- the budget
    def missed_budget(self) -> bool:
        """The last record is the run's end, with a budget its ratio misses, and no calibration yet."""
        last = self.run.history[-1] if self.run.history else None
        return self.cfg.budget is not None and last is not None and last["step"] == self.run.step and \
            "calibration_shift" not in last and not meets_budget(last["gmacs_ratio"], self.cfg)

    def extend(self) -> bool:
        """The planned epochs are done but the budget is not met: one more epoch (up to max_epochs)."""
        run, cfg = self.run, self.cfg
        if cfg.max_steps or not self.missed_budget() or run.step // run.steps_per_epoch >= (cfg.max_epochs or cfg.epochs):
            return False
        run.stop_at = (run.step // run.steps_per_epoch + 1) * run.steps_per_epoch
        run.log(f"budget {cfg.budget} not met yet (GMACs ratio {run.history[-1]['gmacs_ratio']:.3f}): one more epoch")
        return True

    def calibrate(self) -> None:
        """Shift the actor's output until the greedy policy meets a missed budget on the held-out images."""
        cfg, history = self.cfg, self.run.history
        if not cfg.calibrate or not self.missed_budget():
            return
        bias, index = self.task.output_bias()
        base = bias.detach().clone()

        def set_shift(shift: float) -> None:
            with torch.no_grad():
                bias.copy_(base)
                bias[index] += shift

        def ratio_at(shift: float) -> float:
            set_shift(shift)
            return self.held_out_ratio()
        shift, _ = calibrate(ratio_at, history[-1]["gmacs_ratio"], cfg.budget, cfg.budget_tolerance,
                             iters=self.task.calibration_iters)
        set_shift(shift)
        ev = self.held_out()
        self.run.log(f"calibrated the greedy policy for budget {cfg.budget}: actor output shifted by {shift:+.3f}")
        before = {k: v for k, v in history[-1].items() if k not in ("epoch", "step", "elapsed_s", *ev)}
        self.run.record(history[-1]["epoch"], dict(before, calibration_shift=shift, **ev))
        self.run.save(**self.state())

    # --- the end
    def metrics(self) -> dict:
        run, last = self.run, self.run.history[-1] if self.run.history else {}
        keys = ("epoch", "top1", "gmacs", "gmacs_ratio", "decision_gmacs", "agreement", "kl_to_dense",
                self.task.cost_name)
        metrics = dict(steps=run.step, history=run.history, world_size=run.world, config=asdict(self.cfg),
                       **run.about(), dense_gmacs=self.dense_gmacs, curve=self.curve,
                       **{"epochs" if k == "epoch" else k: last[k] for k in keys if k in last})
        if self.cfg.budget is not None and last:
            metrics["budget_met"] = meets_budget(last["gmacs_ratio"], self.cfg)
        return metrics

    def export(self, out) -> None:
        self.task.export(out)
        if self.curve:
            from .report import training_curves
            budget = self.cfg.budget
            training_curves(self.curve, out / "curves.png", budget=budget, cost=self.task.cost_name,
                            title=f"{self.task.command} {self.cfg.model}" + (f", budget {budget}" if budget else ""))
