"""Supervised training and fine-tuning of a timm ViT (optionally with a reduction method active).

Resumable and data-parallel under ``torchrun`` as every training is (:mod:`leanvit.training`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .runtime import adapt
from .train_prance import evaluate_subnetworks, sandwich_step
from .training import Run, _replica_diff, distill_loss, evaluate_top1, export_weights, lr_at


@dataclass
class TrainConfig:
    model: str
    out: str
    data: Optional[str] = None  # None: CIFAR-10 from the default locations
    epochs: int = 30
    batch_size: int = 128  # global, over all processes
    lr: float = 2e-3  # at batch_size
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    seed: int = 0
    checkpoint: Optional[str] = None  # initial weights
    pretrained: bool = False
    num_classes: Optional[int] = None
    method: str = "none"  # train/fine-tune with this reduction method active
    options: dict = field(default_factory=dict)
    distill: float = 0.0  # weight of KL(student || dense teacher), the starting model run dense
    workers: int = 1
    save_every: int = 100  # steps between resumable checkpoints
    train_split: str = "train"
    eval_split: str = "test"
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    max_steps: Optional[int] = None  # stop early (tests, smoke runs); the schedule still spans all epochs
    # PRANCE meta-network training (method "prance"): every step trains the largest sub-network
    # on the labels, then the smallest and ``sandwich - 1`` random ones on its predictions
    sandwich: int = 0
    reorder: bool = True  # with sandwich, from a fresh start: heads and neurons by importance first


def train(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) per ``cfg``; returns the final metrics (also in ``out/metrics.json``)."""
    from .models import create_model  # at call time: tests replace models.create_model
    run = Run(cfg, asdict(cfg))
    kwargs = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
    model = create_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained,
                         num_classes=cfg.num_classes, **kwargs)
    run.setup_data(model)
    if cfg.sandwich and cfg.method != "prance":
        raise ValueError(f"sandwich (meta-network) training needs method 'prance', got {cfg.method!r}")
    if cfg.sandwich and cfg.reorder and not run.state_path.is_file():
        from .elastic import reorder_by_importance
        reorder_by_importance(model)  # so that the first k heads/neurons are the best k
    runner = adapt(model, cfg.method, **cfg.options)
    if cfg.method == "prance":  # the selector is trained by train-selector; here it is frozen (or unused)
        runner.method.requires_grad_(False)
    runner.train()
    net = torch.nn.parallel.DistributedDataParallel(runner) if run.world > 1 else runner
    teacher = None
    if cfg.distill:
        import copy
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    warmup = int(cfg.warmup_epochs * run.steps_per_epoch)

    params = dict(runner.named_parameters())  # the ViT and a learned method's own (e.g. predictors)
    decayed = {n for n, p in params.items() if p.ndim > 1 and "pos_embed" not in n and "token" not in n}
    opt = torch.optim.AdamW([
        {"params": [p for n, p in params.items() if n in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0.0}], lr=cfg.lr)

    step, history = 0, []
    ckpt = run.load()
    if ckpt:
        weights = ckpt["model"]
        (runner if any(k.startswith("model.") for k in weights) else model).load_state_dict(weights)
        opt.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
        if run.is_main:
            log(f"resumed from {run.state_path} at step {step}/{run.total_steps}")

    def save():
        run.save(model=runner.state_dict(), optimizer=opt.state_dict(), step=step, history=history)

    def evaluate_now() -> dict:
        if not cfg.sandwich:
            return dict(top1=evaluate_top1(runner, run.eval_loader))
        return evaluate_subnetworks(runner, run.eval_loader)

    if cfg.sandwich and step == 0 and not history:  # the sub-networks before meta-network training
        history.append(dict(epoch=0, step=0, **evaluate_now(), elapsed_s=run.elapsed()))
        if run.is_main:
            log(json.dumps(history[-1]))

    bar = run.progress(step, "train")
    while step < run.stop_at:
        epoch = step // run.steps_per_epoch
        run_loss = run_n = 0.0
        for batch in run.epoch_loader(step):
            lr = lr_at(step, run.total_steps, warmup, cfg.lr, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if cfg.sandwich:
                loss = sandwich_step(net, runner.method, batch, cfg, teacher, step)
            else:
                logits = net(batch.images)
                loss = F.cross_entropy(logits, batch.labels, label_smoothing=cfg.label_smoothing)
                extra = runner.method.extra_loss()  # e.g. DynamicViT's keep ratio
                if extra is not None:
                    loss = loss + extra
                if teacher is not None:
                    loss = loss + cfg.distill * distill_loss(logits, teacher, batch.images)
                loss.backward()
            opt.step()
            step += 1
            run_loss, run_n = run_loss + loss.item(), run_n + 1
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{run_loss / run_n:.3f}", lr=f"{lr:.2e}")
            if run.should_save(step):
                save()
            if step >= run.stop_at:
                break
        if run.epoch_done(step):  # evaluate, log, checkpoint
            history.append(dict(epoch=epoch + 1, step=step, train_loss=run_loss / max(run_n, 1), **evaluate_now(),
                                elapsed_s=run.elapsed()))
            if run.is_main:
                log(json.dumps(history[-1]))
            save()
    bar.close()
    save()
    metrics = dict(steps=step, total_steps=run.total_steps, epochs_done=step / run.steps_per_epoch,
                   history=history, config=asdict(cfg), world_size=run.world, **run.about())
    done = history and history[-1]["step"] == step
    final = history[-1] if done else evaluate_now()
    metrics.update({k: v for k, v in final.items() if k.startswith("top1")})
    if run.world > 1:  # the replicas must hold identical weights
        metrics["replica_max_abs_diff"] = _replica_diff(model)
    if run.is_main:
        export_weights(model, run.out / "final.safetensors")
        if isinstance(runner.method, torch.nn.Module) and len(runner.method.state_dict()):
            export_weights(runner.method, run.out / "method.safetensors")  # load with --opt weights=PATH
        (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if dist.is_initialized():
        dist.barrier()
    return metrics
