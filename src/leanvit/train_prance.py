"""PRANCE training: the channel-elastic meta-network, then the selector.

Meta-network (``leanvit train-supernet``, :func:`sandwich_step` inside ``leanvit train``): heads
and MLP neurons are first reordered by importance, then every step trains the largest
sub-network on the labels and the smallest plus random ones on the largest's predictions
(weight sharing: all widths are first-k slices of the same weights).

Selector (``leanvit train-selector``): PPO over the stage decisions of each image with the ViT
frozen, rewarded by Result-to-Go: after each decision the network is finished at full width from
there, and the step's reward is that result, ``acc - cost_weight * (GMACs ratio + token_weight *
kept ratio)``, with acc = 0 only when the dense network is right and the finished one wrong. The
token cost is relative to the GMACs cost (the authors' 0.1 per kept ratio against about 0.37 for
DeiT-S's GMACs gives 0.25), so that one weight moves the whole cost and a budget search over it
reaches from "keep everything" (weight 0) to "keep the least".
With ``budget`` the cost weight is found by bisection over short trainings (in log space) until
the greedy selector's mean GMACs on the evaluation images is within ``budget_tolerance`` of
``budget`` x dense.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .rl import PPOConfig, clipped_policy_loss, clipped_value_loss, gae
from .train import Run, _replica_diff, distill_loss, evaluate_top1, export_weights
from .train_policy import PolicyRun, _average_grads, evaluate_policy


# --- the meta-network ---------------------------------------------------------------------------
def sandwich_step(net, method, batch, cfg, teacher, step: int) -> Tensor:
    """Backward the largest sub-network (labels, and the teacher if distilling), then the smallest
    and ``cfg.sandwich - 1`` random ones (KL to the largest's predictions). Returns the summed loss."""
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
        method.fixed = method.subnetwork("smallest") if i == 0 else method.random_subnetwork(gen)
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
@dataclass(kw_only=True)
class SelectorConfig(PolicyRun):
    """``checkpoint``: the meta-network's weights (from train-supernet); ``options``: prance's."""

    cost_weight: float = 0.5  # per unit of the GMACs ratio (finished network / dense)
    token_weight: float = 0.25  # kept-token ratio, relative to the GMACs ratio
    budget: Optional[float] = None  # target GMACs as a fraction of dense: bisection over cost_weight
    budget_tolerance: float = 0.05  # relative
    max_trials: int = 8
    epochs: int = 1
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(gamma=0.9, lam=0.9, epochs=4, lr_actor=1e-4,
                                                             lr_critic=5e-3))


def stage_rewards(correct: Tensor, dense_correct: Tensor, macs_ratio: Tensor, kept: Tensor,
                  cost_weight: float, token_weight: float) -> Tensor:
    """Result-to-Go rewards (T, B): for each decision, the network finished from there.

    correct: (T, B) whether the finished network is right; dense_correct: (B,); macs_ratio,
    kept: (T, B) its block MACs over dense and its kept-token ratio."""
    acc = 1.0 - (dense_correct[None] & ~correct).float()
    return acc - cost_weight * (macs_ratio + token_weight * kept)


def rollout_tensors(rollout: List[dict], batch: int, stages: int, dense_macs: float, labels: Tensor) -> dict:
    """The per-group rollout steps of one forward as (T, B, ...) tensors, T = stages - 1."""
    first = rollout[0]
    T = stages - 1
    out = dict(features=first["features"].new_zeros(T, batch, first["features"].shape[1]),
               actions=first["actions"].new_zeros(T, batch, first["actions"].shape[1]),
               logp=first["logp"].new_zeros(T, batch), correct=torch.zeros(T, batch, dtype=torch.bool),
               macs_ratio=torch.zeros(T, batch), kept=torch.zeros(T, batch))
    for step in rollout:
        t, rows = step["stage"] - 1, step["rows"]
        for key in ("features", "actions", "logp"):
            out[key][t, rows] = step[key]
        out["correct"][t, rows] = step["logits"].argmax(dim=1) == labels[rows]
        out["macs_ratio"][t, rows] = step["block_macs"] / dense_macs
        out["kept"][t, rows] = step["kept"]
    return out


def ppo_update(selector, ro: dict, rewards: Tensor, cfg: PPOConfig, opt_actor, opt_critic, world: int = 1) -> dict:
    """K PPO iterations on one batch of image trajectories (one agent per image)."""
    feats, actions = ro["features"], ro["actions"]
    with torch.no_grad():
        values_old = selector.value(feats)
        dones = torch.zeros_like(rewards, dtype=torch.bool)
        dones[-1] = True
        adv, returns = gae(rewards, values_old, dones, gamma=cfg.gamma, lam=cfg.lam)
        adv = (adv - adv.mean()) / adv.std().clamp_min(1e-6)
    actor_params = [*selector.actor.parameters(), selector.log_std]
    for _ in range(cfg.epochs):
        dist_new = selector.distribution(feats)
        pol = clipped_policy_loss(dist_new.log_prob(actions).sum(-1), ro["logp"], adv, cfg.clip)
        ent = dist_new.entropy().sum(-1).mean()
        opt_actor.zero_grad(set_to_none=True)
        (pol - cfg.entropy_coef * ent).backward()
        _average_grads(actor_params, world)
        torch.nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
        opt_actor.step()

        vloss = cfg.value_coef * clipped_value_loss(selector.value(feats), values_old, returns, cfg.clip)
        opt_critic.zero_grad(set_to_none=True)
        vloss.backward()
        _average_grads(selector.critic, world)
        torch.nn.utils.clip_grad_norm_(selector.critic.parameters(), cfg.max_grad_norm)
        opt_critic.step()
    return dict(policy_loss=pol.item(), value_loss=vloss.item())


def train_selector(cfg: SelectorConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one selector at ``cfg.cost_weight``; exports ``out/selector.safetensors``."""
    import leanvit
    from .flops import count_macs
    from .models import create_model
    run = Run(cfg, _config_dict(cfg))
    model = create_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained)
    run.setup_data(model)
    runner = leanvit.adapt(model.eval(), "prance", **cfg.options)
    dense = leanvit.adapt(model, "none")
    method, selector = runner.method, runner.method.selector
    if method.fixed is not None:
        raise ValueError("train-selector trains the selector; do not pass the 'subnet' option")
    opt_actor = torch.optim.Adam([*selector.actor.parameters(), selector.log_std], lr=cfg.ppo.lr_actor)
    opt_critic = torch.optim.Adam(selector.critic.parameters(), lr=cfg.ppo.lr_critic)
    dense_macs = method.dense_block_macs(runner)

    step, history = 0, []
    ckpt = run.load()
    if ckpt:
        method.load_state_dict(ckpt["selector"])
        opt_actor.load_state_dict(ckpt["opt_actor"])
        opt_critic.load_state_dict(ckpt["opt_critic"])
        step, history = ckpt["step"], ckpt["history"]
        if run.is_main:
            log(f"resumed from {run.state_path} at step {step}/{run.total_steps}")

    def save():
        run.save(selector=method.state_dict(), opt_actor=opt_actor.state_dict(), opt_critic=opt_critic.state_dict(),
                 step=step, history=history)

    bar = run.progress(step, "train-selector")
    while step < run.stop_at:
        epoch = step // run.steps_per_epoch
        sums = dict(reward=0.0, macs=0.0, kept=0.0, acc=0.0, n=0)
        for batch in run.epoch_loader(step):
            method.sampling = True
            with torch.no_grad():
                dense_correct = dense(batch.images).argmax(1) == batch.labels
                runner(batch.images)
            ro = rollout_tensors(method.rollout, batch.images.shape[0], method.n_stages, dense_macs, batch.labels)
            rewards = stage_rewards(ro["correct"], dense_correct, ro["macs_ratio"], ro["kept"],
                                    cfg.cost_weight, cfg.token_weight)
            losses = ppo_update(selector, ro, rewards, cfg.ppo, opt_actor, opt_critic, run.world)
            sums["reward"] += float(rewards.sum(0).mean())
            sums["macs"] += float(ro["macs_ratio"][-1].mean())
            sums["kept"] += float(ro["kept"][-1].mean())
            sums["acc"] += float(ro["correct"][-1].float().mean())
            sums["n"] += 1
            step += 1
            bar.update()
            n = sums["n"]
            bar.set_postfix(epoch=epoch, reward=f"{sums['reward'] / n:.3f}", macs=f"{sums['macs'] / n:.2f}",
                            kept=f"{sums['kept'] / n:.2f}", **{k: f"{v:.3f}" for k, v in losses.items()})
            if run.should_save(step):
                save()
            if step >= run.stop_at:
                break
        if run.epoch_done(step) or step >= run.stop_at:
            ev = evaluate_policy(runner, run.eval_loader)
            ev["gmacs_ratio"] = ev["gmacs"] / count_macs(dense, run.eval_set[0][0][None])
            n = max(sums["n"], 1)
            history.append(dict(epoch=epoch + 1, step=step, mean_return=sums["reward"] / n,
                                rollout_macs_ratio=sums["macs"] / n, rollout_kept=sums["kept"] / n,
                                rollout_acc=100 * sums["acc"] / n, **ev, elapsed_s=run.elapsed()))
            if run.is_main:
                log(json.dumps(history[-1]))
            save()
    bar.close()
    method.sampling = False
    metrics = dict(steps=step, history=history, world_size=run.world, config=_config_dict(cfg),
                   **{k: history[-1][k] for k in ("top1", "gmacs", "gmacs_ratio")})
    if run.world > 1:  # the selector replicas must be identical
        metrics["replica_max_abs_diff"] = _replica_diff(method)
    if run.is_main:
        export_weights(method, run.out / "selector.safetensors", metadata=method.options_metadata())
        (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if dist.is_initialized():
        dist.barrier()
    return metrics


def fit_budget(cfg: SelectorConfig, log: Callable[[str], None] = print,
               train: Callable[..., dict] = train_selector, trials_dir: Optional[str] = None) -> dict:
    """Find the cost weight whose selector meets ``cfg.budget`` (GMACs ratio within the relative
    tolerance), by bracketing in log space: multiply or divide by 4 until the budget is bracketed,
    then bisect, stepping to the log-linear interpolation of the bracket (kept within its middle
    half) rather than its plain midpoint. Every trial is a full ``train_selector`` run in
    ``trials_dir/w<weight>`` (default ``out/trials``); finished trials are reused, also by other
    budgets sharing the directory. Ships the trial closest to the budget as
    ``out/selector.safetensors``; ``out/budget.json`` lists the trials."""
    if not cfg.budget or not 0 < cfg.budget <= 1:
        raise ValueError(f"budget must be a fraction of the dense GMACs in (0, 1], got {cfg.budget}")
    out = Path(cfg.out)
    trials_root = Path(trials_dir) if trials_dir else out / "trials"
    target, tol = cfg.budget, cfg.budget_tolerance

    def trial_cfg(weight: float) -> SelectorConfig:
        return replace(cfg, out=str(trials_root / f"w{weight:.6g}"), cost_weight=weight, budget=None)

    def finished(weight: float) -> Optional[dict]:
        done = Path(trial_cfg(weight).out) / "metrics.json"
        if done.is_file():
            m = json.loads(done.read_text())
            if m["config"] == _config_dict(trial_cfg(weight)):
                return m
        return None

    known = {}  # weight -> metrics, every finished trial of this configuration
    if trials_root.is_dir():
        for d in sorted(trials_root.glob("w*")):
            w = float(d.name[1:])
            m = finished(w)
            if m is not None:
                known[w] = m

    def met(m):
        return abs(m["gmacs_ratio"] / target - 1) <= tol

    new = 0
    while not any(met(m) for m in known.values()) and new < cfg.max_trials:
        weight = float(f"{_next_weight({w: m['gmacs_ratio'] for w, m in known.items()}, target, cfg.cost_weight):.6g}")
        m = finished(weight) or train(trial_cfg(weight), log=log)
        known[weight] = m
        new += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            log(f"budget {target}: cost_weight={weight:.4g} -> GMACs ratio {m['gmacs_ratio']:.3f}, top-1 {m['top1']:.2f}%")
    trials = [dict(cost_weight=w, gmacs_ratio=m["gmacs_ratio"], top1=m["top1"], gmacs=m["gmacs"],
                   dir=trial_cfg(w).out) for w, m in sorted(known.items())]
    if not trials:
        raise ValueError("no trial ran: max_trials must be at least 1")
    best = min(trials, key=lambda t: abs(t["gmacs_ratio"] / target - 1))
    result = dict(budget=target, tolerance=tol, met=abs(best["gmacs_ratio"] / target - 1) <= tol,
                  chosen=best, trials=trials)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(best["dir"]) / "selector.safetensors", out / "selector.safetensors")
        (out / "budget.json").write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return result


def _next_weight(ratios: dict, target: float, start: float) -> float:
    """The next cost weight to try, from {weight: GMACs ratio} of the trials so far."""
    if not ratios:
        return start
    dear = {w: r for w, r in ratios.items() if r > target}  # still too many GMACs: weigh cost more
    cheap = {w: r for w, r in ratios.items() if r <= target}
    if not cheap:
        return max(dear) * 4
    if not dear:
        return min(cheap) / 4
    lo, hi = max(dear), min(cheap)
    if lo >= hi:  # not monotone (training noise): split the two trials nearest the target
        lo, hi = sorted(sorted(ratios, key=lambda w: abs(ratios[w] - target))[:2])
        return math.sqrt(lo * hi)
    f = (ratios[lo] - target) / max(ratios[lo] - ratios[hi], 1e-12)
    f = min(max(f, 0.25), 0.75)
    return math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo)))


def _config_dict(cfg: SelectorConfig) -> dict:
    d = asdict(cfg)
    d["ppo"] = asdict(cfg.ppo)
    return d
