"""Training RL4EViT's agents by multi-agent PPO (the paper's Algorithm 1).

Each batch is one rollout: the ViT runs masked (pruned tokens stay in place, marked invalid) with
actions sampled from the shared actor at the pruning layers; every agent's rewards follow
equations 1-2; GAE runs along each agent's own trajectory over the pruning layers (an agent's
episode ends when it prunes its token, or at the last layer); then K PPO iterations update the
actor (clipped surrogate) and the critic (clipped value loss). Odd epochs train the agents with the
ViT frozen; with ``finetune_vit`` even epochs fine-tune the ViT with the agents frozen (greedy).
Resumable like ``leanvit train``; under ``torchrun`` each process rolls out its shard and the
actor/critic gradients are averaged over processes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import DATA_HELP
from .measure import macs_per_image
from .methods.rl4evit import agent_rewards
from .options import arg, natural, nonnegative, path, positive, positive_int
from .rl import PPOConfig, clipped_policy_loss, clipped_value_loss, gae
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


@dataclass(kw_only=True)
class PolicyConfig(PolicyRun):
    alpha: float = arg(0.8, nonnegative, "weight of r1 (-1 per kept token)")
    beta: float = arg(1.0, nonnegative, "weight of r2 (correct / tokens kept)")
    epochs: int = arg(2, positive_int)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    finetune_vit: bool = arg(False, help="even epochs fine-tune the ViT, agents frozen")
    lr_vit: float = arg(1e-5, positive)


def rollout_tensors(rollout):
    """Stack a rollout's steps into (T, B, P, ...) tensors."""
    keys = ("tokens", "cls", "action", "logp", "alive", "kept")
    return {k: torch.stack([step[k] for step in rollout]) for k in keys}


def ppo_update(method, ro: dict, rewards: torch.Tensor, cfg: PPOConfig, opt_actor, opt_critic,
               world: int = 1) -> dict:
    """K iterations of PPO on one rollout; returns the last losses.

    Multi-agent (RL4EViT): every token is an agent with its own reward, value and advantage; its
    episode ends when it prunes its token. Single-agent (the ablation): one agent per image takes
    the joint action of a layer (log-probability = sum over the tokens), with the layer's summed
    reward and one value from [mean token ; CLS]; its episode is the image.
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
        values_old = values_of()
        dones = torch.zeros_like(weight, dtype=torch.bool) if single else (~ro["kept"]) | ~ro["alive"]
        dones[-1] = True
        adv, returns = gae(step_rewards, values_old, dones, gamma=cfg.gamma, lam=cfg.lam)
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
    correct = total = macs = 0.0
    with torch.inference_mode():
        for batch in batches_on(loader, runner):
            with runner.tracing() as trace:
                logits = runner(batch.images)
            correct += float((logits.argmax(1) == batch.labels).sum())
            total += batch.images.shape[0]
            macs += float(macs_per_image(runner, trace, batch.images).sum())
    correct, total, macs = all_sum([correct, total, macs])
    return dict(top1=100 * correct / max(total, 1), gmacs=macs / max(total, 1) / 1e9)


def train_policy(cfg: PolicyConfig, log: Callable[[str], None] = print) -> dict:
    from .models import create_model  # at call time: tests replace models.create_model
    run = Run(cfg, log)
    model = create_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained).to(run.device)
    run.setup_data(model)
    runner = adapt(model, "rl4evit", **cfg.options)
    method = runner.method
    opt_actor = torch.optim.Adam(method.actor.parameters(), lr=cfg.ppo.lr_actor)
    opt_critic = torch.optim.Adam(method.critic.parameters(), lr=cfg.ppo.lr_critic)
    opt_vit = torch.optim.AdamW(model.parameters(), lr=cfg.lr_vit, weight_decay=0.05)
    optimizers = dict(opt_actor=opt_actor, opt_critic=opt_critic, opt_vit=opt_vit)

    def agents_epoch(epoch: int) -> bool:
        return epoch % 2 == 0 or not cfg.finetune_vit  # the paper's odd (1-based) epochs

    def restore(ckpt):
        runner.load_state_dict(ckpt["model"])
        for k, o in optimizers.items():
            o.load_state_dict(ckpt[k])

    def step(batch, i) -> dict:
        runner.masked = True
        if agents_epoch(i // run.steps_per_epoch):
            runner.eval()  # the ViT is frozen: no dropout, no gradients
            method.sampling = True
            with torch.no_grad():
                logits = runner(batch.images)
            correct = logits.argmax(1) == batch.labels
            ro = rollout_tensors(method.rollout)
            rewards = agent_rewards(ro["kept"], ro["alive"], correct, cfg.alpha, cfg.beta)
            losses = ppo_update(method, ro, rewards, cfg.ppo, opt_actor, opt_critic, run.world)
            alive = ro["alive"].float()
            logged = dict(reward=float(rewards.sum((0, 2)).mean()),
                          keep=float((ro["kept"].float() * alive).sum() / alive.sum()))
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
        return dict(logged, acc=float(correct.float().mean()), **{k: f"{v:.3f}" for k, v in losses.items()})

    def evaluate(epoch, sums, n) -> dict:
        return dict(kind="agents" if agents_epoch(epoch) else "vit", mean_reward=sums["reward"] / n,
                    keep_ratio=sums["keep"] / n, rollout_acc=100 * sums["acc"] / n,
                    **evaluate_policy(runner, run.eval_loader))

    fit(run, "train-policy", step, evaluate, restore=restore, evaluate_at_stop=True,
        state=lambda: dict(model=runner.state_dict(), **{k: o.state_dict() for k, o in optimizers.items()}))
    metrics = dict(steps=run.step, history=run.history, world_size=run.world, config=asdict(cfg), **run.about())

    def export(out):
        export_weights(method, out / "policy.safetensors")
        if cfg.finetune_vit:
            export_weights(model, out / "vit.safetensors")

    # every process must hold the same agents (and ViT, when fine-tuned)
    return run.finish(metrics, replicas=runner if cfg.finetune_vit else method, export=export)
