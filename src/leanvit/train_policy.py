"""Training RL4EViT's agents by multi-agent PPO (the paper's Algorithm 1).

Each batch is one rollout: the ViT runs masked (pruned tokens stay in place, marked invalid) with
actions sampled from the shared actor at the pruning layers; every agent's rewards follow
equations 1-2; GAE runs along each agent's own trajectory over the pruning layers (an agent's
episode ends when it prunes its token, or at the last layer); then K PPO iterations update the
actor (clipped surrogate) and the critic (clipped value loss). Odd epochs train the agents with the
ViT frozen; with ``finetune_vit`` even epochs fine-tune the ViT with the agents frozen (greedy).
Resumable like ``leanvit train``; under ``torchrun`` each process rolls out its shard and the
actor/critic gradients are averaged over processes.

MAPPO's settings by default: an entropy bonus of 0.01, value normalisation (:class:`~leanvit.rl.ValueNorm`)
and orthogonal initialisation of the actor and critic (``init="default"``, ``value_norm=False``,
``entropy_coef=0`` for the settings before 2026-12-02). ``reward`` picks the accuracy signal γ of r2:
``correct`` (the paper's, 0/1), ``agreement`` (the reduced prediction equals the dense model's) or
``kl`` (exp(-KL(dense || reduced)) per image), the last two from a no-grad dense forward of the same
batch. With ``budget`` alpha is the cost weight of a non-negative PI controller
(:class:`~leanvit.rl.BudgetController`) on the greedy policy's GMACs ratio on each batch, the actor's
MACs included; after training the keep logit is shifted (:func:`~leanvit.rl.calibrate`) until the
greedy policy meets the budget within ``budget_tolerance`` on the held-out evaluation images. Every
batch's reward, kept fraction, GMACs ratio and alpha go to ``metrics.json`` (``curve``) and, with a
budget, a plot of them to ``curves.png``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import DATA_HELP
from .measure import count_macs, macs_per_image
from .methods.rl4evit import R2_TO, agent_rewards
from .options import arg, fraction, natural, nonnegative, one_of, path, positive, positive_int
from .rl import BudgetController, PPOConfig, ValueNorm, calibrate, clipped_policy_loss, clipped_value_loss, gae, \
    orthogonal_init
from .runtime import adapt
from .training import Run, all_sum, batches_on, export_weights, fit


@dataclass(kw_only=True)
class PolicyRun:
    """What every policy training (RL4EViT's agents, PRANCE's selector) is given besides its own
    hyperparameters: the model, data, and the resumable run's options. Each
    :func:`~leanvit.options.arg` field is a command-line option of the same name."""

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
    # selection, calibration, budgets: held-out training images, never test
    eval_split: str = arg("holdout", help=(
        "where the policy is evaluated, its budget checked and calibrated: 'holdout' (default), --limit-eval "
        "images (default 1000) of the training split, class-balanced and never trained on; or a split name: "
        "'test' evaluates on test images (recorded in metrics.json; do not select or tune on it)"))
    limit_train: Optional[int] = arg(None, positive_int)
    limit_eval: Optional[int] = arg(None, positive_int)
    max_steps: Optional[int] = arg(None, positive_int)
    device: Optional[str] = None  # --device (leanvit.device.select_device; None: cuda when available)
    amp: str = "off"  # --amp: off or bf16 autocast


REWARDS = ("correct", "agreement", "kl")


@dataclass(kw_only=True)
class PolicyConfig(PolicyRun):
    alpha: Optional[float] = arg(None, nonnegative, (  # default 0.8, or 0.03 (start) with a budget
        "weight of r1 (-1 per kept token): default 0.8 (the paper's); with --budget the starting value, "
        "default 0.03"))
    beta: float = arg(1.0, nonnegative, "weight of r2 (accuracy signal / tokens kept)")
    r2_to: str = arg("kept", one_of(*R2_TO), (
        "who earns r2: kept (the agents that kept their token: the paper's and the authors' code) or alive "
        "(every agent that acted: the runs before 2026-12-03)"))
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
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(entropy_coef=0.01))
    finetune_vit: bool = arg(False, help="even epochs fine-tune the ViT, agents frozen")
    lr_vit: float = arg(1e-5, positive)


def rollout_tensors(rollout):
    """Stack a rollout's steps into (T, B, P, ...) tensors."""
    keys = ("tokens", "cls", "action", "logp", "alive", "kept")
    return {k: torch.stack([step[k] for step in rollout]) for k in keys}


def ppo_update(method, ro: dict, rewards: torch.Tensor, cfg: PPOConfig, opt_actor, opt_critic,
               world: int = 1, value_norm: Optional[ValueNorm] = None) -> dict:
    """K iterations of PPO on one rollout; returns the last losses.

    Multi-agent (RL4EViT): every token is an agent with its own reward, value and advantage; its
    episode ends when it prunes its token. Single-agent (the ablation): one agent per image takes
    the joint action of a layer (log-probability = sum over the tokens), with the layer's summed
    reward and one value from [mean token ; CLS]; its episode is the image. With ``value_norm``
    the critic predicts normalised returns (MAPPO): GAE reads its outputs denormalised, and its
    targets are the normalised returns (after the normaliser has seen them).
    """
    single = method.agents == "single"
    alive = ro["alive"].float()

    def values_of():
        tokens, cls = ro["tokens"].flatten(0, 1), ro["cls"].flatten(0, 1)
        if single:
            return method.pooled_value(tokens, cls, ro["alive"].flatten(0, 1)).view(rewards.shape[:2])
        return method.value(tokens, cls).view_as(rewards)

    def logp_of(logp_tokens):
        return (logp_tokens * alive).sum(dim=2) if single else logp_tokens

    weight = rewards.new_ones(rewards.shape[:2]) if single else alive
    step_rewards = (rewards * alive).sum(dim=2) if single else rewards
    with torch.no_grad():
        values_old = values_of()  # the critic's outputs (normalised with value_norm)
        dones = torch.zeros_like(weight, dtype=torch.bool) if single else (~ro["kept"]) | ~ro["alive"]
        dones[-1] = True
        adv, returns = gae(step_rewards, values_old if value_norm is None else value_norm.denormalize(values_old),
                           dones, gamma=cfg.gamma, lam=cfg.lam)
        if value_norm is not None:
            value_norm.update(returns, weight)
            returns = value_norm.normalize(returns)
        n = weight.sum().clamp_min(1)
        mean = (adv * weight).sum() / n
        std = (((adv - mean) ** 2) * weight).sum().div(n).sqrt().clamp_min(1e-6)
        adv = (adv - mean) / std
        logp_old = logp_of(ro["logp"])
    for _ in range(cfg.epochs):
        dist_new = torch.distributions.Categorical(logits=method.actor(ro["tokens"]))
        pol = clipped_policy_loss(logp_of(dist_new.log_prob(ro["action"])), logp_old, adv, cfg.clip, weight=weight)
        ent = (dist_new.entropy() * alive).sum() / alive.sum().clamp_min(1)
        opt_actor.zero_grad(set_to_none=True)
        (pol - cfg.entropy_coef * ent).backward()
        _average_grads(method.actor, world)
        torch.nn.utils.clip_grad_norm_(method.actor.parameters(), cfg.max_grad_norm)
        opt_actor.step()

        vloss = cfg.value_coef * clipped_value_loss(values_of(), values_old, returns, cfg.clip, weight=weight)
        opt_critic.zero_grad(set_to_none=True)
        vloss.backward()
        _average_grads(method.critic, world)
        torch.nn.utils.clip_grad_norm_(method.critic.parameters(), cfg.max_grad_norm)
        opt_critic.step()
    return dict(policy_loss=pol.item(), value_loss=vloss.item(), entropy=ent.item())


def _average_grads(module, world):
    """Average the gradients of a module (or a list of parameters) over the processes."""
    if world > 1:
        for p in (module.parameters() if isinstance(module, torch.nn.Module) else module):
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def evaluate_policy(runner, loader) -> dict:
    """Greedy policy, real token removal: top-1 and GMACs per image (summed over processes)."""
    runner.eval()
    runner.masked, runner.method.sampling = False, False
    correct = total = macs = decision = 0.0
    with torch.inference_mode():
        for batch in batches_on(loader, runner):
            with runner.tracing() as trace:
                logits = runner(batch.images)
            correct += float((logits.argmax(1) == batch.labels).sum())
            total += batch.images.shape[0]
            macs += float(macs_per_image(runner, trace, batch.images).sum())
            decision += sum(float(torch.as_tensor(rec["macs"], dtype=torch.float64).expand(batch.images.shape[0]).sum())
                            for rec in trace if "macs" in rec)
    correct, total, macs, decision = all_sum([correct, total, macs, decision])
    return dict(top1=100 * correct / max(total, 1), gmacs=macs / max(total, 1) / 1e9,
                decision_gmacs=decision / max(total, 1) / 1e9)


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


def accuracy_signal(kind: str, logits, labels, dense_logits=None):
    """(B,) the reward's γ per image: 0/1 correct, 0/1 agreement with the dense prediction, or
    exp(-KL(dense || reduced)) in (0, 1]."""
    if kind == "correct":
        return (logits.argmax(1) == labels).float()
    if kind == "agreement":
        return (logits.argmax(1) == dense_logits.argmax(1)).float()
    dense_logp, logp = F.log_softmax(dense_logits.float(), dim=1), F.log_softmax(logits.float(), dim=1)
    return torch.exp(-(dense_logp.exp() * (dense_logp - logp)).sum(1).clamp_min(0))


def train_policy(cfg: PolicyConfig, log: Callable[[str], None] = print) -> dict:
    if cfg.budget is not None and not 0 < cfg.budget <= 1:
        raise ValueError(f"budget must be a fraction of the dense GMACs in (0, 1], got {cfg.budget}")
    from .models import create_model  # at call time: tests replace models.create_model
    run = Run(cfg, log)
    model = create_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained).to(run.device)
    run.setup_data(model)
    runner = adapt(model, "rl4evit", **cfg.options)
    dense = adapt(model, "none")  # the same (possibly fine-tuned) ViT, every token
    method = runner.method
    if cfg.init == "orthogonal" and not method.weights:  # not over given weights; a resume loads its own over these
        orthogonal_init(method.actor, 0.01)
        orthogonal_init(method.critic, 1.0)
    value_norm = ValueNorm(total=all_sum).to(run.device) if cfg.value_norm else None
    opt_actor = torch.optim.Adam(method.actor.parameters(), lr=cfg.ppo.lr_actor)
    opt_critic = torch.optim.Adam(method.critic.parameters(), lr=cfg.ppo.lr_critic)
    opt_vit = torch.optim.AdamW(model.parameters(), lr=cfg.lr_vit, weight_decay=0.05)
    optimizers = dict(opt_actor=opt_actor, opt_critic=opt_critic, opt_vit=opt_vit)
    dense_gmacs = count_macs(dense, run.eval_set[0][0][None].to(run.device))
    alpha = cfg.alpha if cfg.alpha is not None else (0.03 if cfg.budget else 0.8)
    control = BudgetController(cfg.budget, cfg.dual_lr, cfg.dual_p, integral=alpha) if cfg.budget else None
    curve = []  # one record per batch

    def agents_epoch(epoch: int) -> bool:
        return epoch % 2 == 0 or not cfg.finetune_vit  # the paper's odd (1-based) epochs

    def restore(ckpt):
        nonlocal alpha, control
        runner.load_state_dict(ckpt["model"])
        for k, o in optimizers.items():
            o.load_state_dict(ckpt[k])
        if value_norm is not None:
            value_norm.load_state_dict(ckpt["value_norm"])
        alpha, curve[:] = ckpt["alpha"], ckpt["curve"]
        if control is not None:
            control = BudgetController(**ckpt["control"])

    def state() -> dict:
        return dict(model=runner.state_dict(), **{k: o.state_dict() for k, o in optimizers.items()},
                    value_norm=value_norm.state_dict() if value_norm is not None else None, alpha=alpha,
                    curve=list(curve), control=asdict(control) if control is not None else None)

    def step(batch, i) -> dict:
        nonlocal alpha
        runner.masked = True
        if agents_epoch(i // run.steps_per_epoch):
            runner.eval()  # the ViT is frozen: no dropout, no gradients
            method.sampling = True
            with torch.no_grad():
                logits = runner(batch.images)
                dense_logits = dense(batch.images) if cfg.reward != "correct" else None
            correct = logits.argmax(1) == batch.labels
            signal = accuracy_signal(cfg.reward, logits, batch.labels, dense_logits)
            ro = rollout_tensors(method.rollout)
            used = alpha
            rewards = agent_rewards(ro["kept"], ro["alive"], signal, used, cfg.beta, cfg.r2_to)
            losses = ppo_update(method, ro, rewards, cfg.ppo, opt_actor, opt_critic, run.world, value_norm)
            alive = ro["alive"].float()
            logged = dict(reward=float(rewards.sum((0, 2)).mean()),
                          keep=float((ro["kept"].float() * alive).sum() / alive.sum()))
            if control is not None:
                logged["greedy"] = greedy_macs_ratio(runner, batch.images, dense_gmacs)
                alpha = control.update(logged["greedy"])
            curve.append(dict(step=i + 1, reward=logged["reward"], keep=logged["keep"], alpha=used,
                              signal=float(signal.mean()), **({"gmacs_ratio": logged["greedy"]} if control else {})))
        else:
            runner.train()
            method.sampling = False
            method.requires_grad_(False)
            logits = runner(batch.images)
            loss = F.cross_entropy(logits, batch.labels)
            opt_vit.zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(model, run.world)
            opt_vit.step()
            method.requires_grad_(True)
            correct = logits.argmax(1) == batch.labels
            losses = dict(ce=loss.item())
            logged = dict(reward=0.0, keep=0.0)  # no rollout
        return dict(logged, acc=float(correct.float().mean()), **{k: f"{v:.3f}" for k, v in losses.items()},
                    **({"alpha": f"{alpha:.4f}"} if control is not None else {}))

    def evaluate(epoch, sums, n) -> dict:
        ev = evaluate_policy(runner, run.eval_loader)
        return dict(kind="agents" if agents_epoch(epoch) else "vit", mean_reward=sums["reward"] / n,
                    keep_ratio=sums["keep"] / n, rollout_acc=100 * sums["acc"] / n, alpha=alpha,
                    **(dict(train_greedy_macs_ratio=sums["greedy"] / n) if "greedy" in sums else {}),
                    **ev, gmacs_ratio=ev["gmacs"] / dense_gmacs)

    fit(run, "train-policy", step, evaluate, restore=restore, evaluate_at_stop=True, state=state)
    method.sampling, runner.masked = False, False
    history = run.history
    if cfg.calibrate and cfg.budget and history and "calibration_shift" not in history[-1] \
            and not meets_budget(history[-1]["gmacs_ratio"], cfg):
        bias = method.actor[-1].bias
        base = bias.detach().clone()

        def set_shift(shift: float) -> None:
            with torch.no_grad():
                bias.copy_(base)
                bias[1] += shift  # the keep logit: every agent keeps more with a larger shift

        def ratio_at(shift: float) -> float:
            set_shift(shift)
            return evaluate_policy(runner, run.eval_loader)["gmacs"] / dense_gmacs
        # 20 halvings of [-8, 8]: a young actor's keep margins (MAPPO's init: output gain 0.01) are narrow
        shift, _ = calibrate(ratio_at, history[-1]["gmacs_ratio"], cfg.budget, cfg.budget_tolerance, iters=20)
        set_shift(shift)
        ev = evaluate_policy(runner, run.eval_loader)
        run.log(f"calibrated the greedy policy for budget {cfg.budget}: keep logit shifted by {shift:+.3f}")
        before = {k: v for k, v in history[-1].items() if k not in ("epoch", "step", "elapsed_s", *ev)}
        run.record(history[-1]["epoch"], dict(before, calibration_shift=shift, **ev, gmacs_ratio=ev["gmacs"] / dense_gmacs))
        run.save(**state())
    last = history[-1] if history else {}
    metrics = dict(steps=run.step, history=history, world_size=run.world, config=asdict(cfg), **run.about(),
                   dense_gmacs=dense_gmacs, curve=curve,
                   **{k: last[k] for k in ("top1", "gmacs", "gmacs_ratio", "decision_gmacs", "alpha") if k in last})
    if cfg.budget and last:
        metrics["budget_met"] = meets_budget(last["gmacs_ratio"], cfg)

    def export(out):
        export_weights(method, out / "policy.safetensors", metadata=method.options_metadata())
        if cfg.finetune_vit:
            export_weights(model, out / "vit.safetensors")
        if curve:
            from .report import training_curves
            training_curves(curve, out / "curves.png", budget=cfg.budget,
                            title=f"train-policy {cfg.model}" + (f", budget {cfg.budget}" if cfg.budget else ""))

    # every process must hold the same agents (and ViT, when fine-tuned)
    return run.finish(metrics, replicas=runner if cfg.finetune_vit else method, export=export)


def meets_budget(ratio: float, cfg) -> bool:
    """Within ``cfg.budget_tolerance`` (relative) of ``cfg.budget``."""
    return abs(ratio / cfg.budget - 1) <= cfg.budget_tolerance
