"""Supervised training and fine-tuning of a timm ViT (optionally with a reduction method active).

Resumable and data-parallel under ``torchrun`` as every training is (:mod:`leanvit.training`).
The step and evaluation are :class:`~leanvit.training.Supervised`'s; with PRANCE (the meta-network's
sandwich steps, or fine-tuning under a frozen selector) :class:`~leanvit.train_prance.MetaNetwork`'s.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .data import DATA_HELP
from .methods.base import file_metadata
from .options import arg, below_one, natural, nonnegative, one_of, path, positive, positive_int
from .train_prance import MetaNetwork
from .training import EVAL_SPLIT_HELP, HOLDOUT, Run, Supervised, export_weights, fit, lr_at


@dataclass
class TrainConfig:
    """What ``leanvit train`` (and ``train-supernet``) takes: each :func:`~leanvit.options.arg` field
    is a command-line option of the same name."""

    model: str
    out: str = arg(check=path, help="run directory: checkpoints, log, final weights, metrics")
    data: Optional[str] = arg(None, path, DATA_HELP)  # None: CIFAR-10 from the default locations
    epochs: int = arg(30, positive_int)
    batch_size: int = arg(128, positive_int, "global batch size over all processes")
    lr: float = arg(2e-3, positive)  # at batch_size
    min_lr: float = arg(1e-5, nonnegative)
    weight_decay: float = arg(0.05, nonnegative)
    warmup_epochs: float = arg(1.0, nonnegative)
    label_smoothing: float = arg(0.1, below_one)
    drop_path: float = arg(0.0, below_one)
    seed: int = arg(0, natural)
    checkpoint: Optional[str] = None  # initial weights
    pretrained: bool = False
    num_classes: Optional[int] = None
    method: str = arg("none", help="train with this reduction method active (fine-tuning)")
    options: dict = field(default_factory=dict)
    # KL(student || dense teacher), the teacher being the starting model run dense
    distill: float = arg(0.0, nonnegative, "weight of KL to the starting model run dense")
    # DynamicViT's authors train the predictors at the learning rate and the ViT at 1% of it, the
    # ViT frozen for the first 5 of 30 epochs
    backbone_lr_scale: float = arg(1.0, nonnegative, "the ViT's learning rate as a fraction of the scheduled "
                                   "one; a learned method's own parameters (e.g. DynamicViT's predictors) train "
                                   "at the full rate (DynamicViT's authors: 0.01)")
    freeze_backbone_epochs: float = arg(0.0, nonnegative, "the ViT is frozen (learning rate 0) for the first "
                                        "epochs while the method's parameters train (DynamicViT's authors: 5 of 30)")
    workers: int = arg(1, natural, "data loading processes")
    save_every: int = arg(100, positive_int, "steps between resumable checkpoints")
    train_split: str = arg("train")
    eval_split: str = arg(HOLDOUT, help=EVAL_SPLIT_HELP)
    limit_train: Optional[int] = arg(None, positive_int)
    limit_eval: Optional[int] = arg(None, positive_int)
    # stop early (tests, smoke runs)
    max_steps: Optional[int] = arg(None, positive_int, "stop after this many steps (the schedule still spans --epochs)")
    # PRANCE meta-network training (method "prance"): every step trains the largest sub-network
    # on the labels, then the smallest and ``sandwich - 1`` random ones on its predictions
    sandwich: int = arg(0, natural, "sub-networks per step besides the largest: the smallest, then random ones")
    sandwich_widths: str = arg("per-stage", one_of("per-stage", "uniform"), (
        "the random sub-networks' widths: 'per-stage' (default) draws the heads and the MLP width of every "
        "stage independently, the mixes the selector picks; 'uniform': one draw shared by all stages"))
    reorder: bool = arg(True)  # with sandwich, from a fresh start: heads and neurons by importance first
    device: Optional[str] = None  # --device (leanvit.device.select_device; None: cuda when available)
    amp: str = "off"  # --amp: off or bf16 autocast


def train(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) per ``cfg``; returns the final metrics (also in ``out/metrics.json``)."""
    from .models import create_model  # at call time: tests replace models.create_model
    run = Run(cfg, log)
    recipe = MetaNetwork(cfg) if cfg.sandwich or cfg.method == "prance" else Supervised(cfg)
    kwargs = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
    model = create_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained,
                         num_classes=cfg.num_classes, **kwargs).to(run.device)
    run.setup_data(model)
    runner = recipe.adapt(model, fresh=not run.state_path.is_file())
    runner.train()
    net = torch.nn.parallel.DistributedDataParallel(runner, device_ids=run.device_ids) if run.world > 1 else runner
    teacher = None
    if cfg.distill:
        import copy
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    warmup = int(cfg.warmup_epochs * run.steps_per_epoch)

    params = dict(runner.named_parameters())  # the ViT and a learned method's own (e.g. predictors)
    decayed = {n for n, p in params.items() if p.ndim > 1 and "pos_embed" not in n and "token" not in n}
    groups = [dict(params=[p for n, p in params.items() if (n in decayed) == decay and n.startswith("method.") == own],
                   weight_decay=cfg.weight_decay if decay else 0.0, backbone=not own)
              for own in (False, True) for decay in (True, False)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    frozen_steps = int(cfg.freeze_backbone_epochs * run.steps_per_epoch)

    def restore(ckpt):
        weights = ckpt["model"]
        (runner if any(k.startswith("model.") for k in weights) else model).load_state_dict(weights)
        opt.load_state_dict(ckpt["optimizer"])

    def step(batch, i):
        lr = lr_at(i, run.total_steps, warmup, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr if not g["backbone"] else 0.0 if i < frozen_steps else lr * cfg.backbone_lr_scale
        opt.zero_grad(set_to_none=True)
        loss = recipe.loss(net, runner, batch, teacher, i)
        opt.step()
        return dict(loss=loss.item(), lr=f"{lr:.2e}")

    def evaluate_now() -> dict:
        return recipe.evaluate(runner, run.eval_loader)

    fit(run, "train", step, lambda epoch, sums, n: dict(train_loss=sums["loss"] / n, **evaluate_now()),
        state=lambda: dict(model=runner.state_dict(), optimizer=opt.state_dict()), restore=restore,
        first=evaluate_now if recipe.first else None)
    metrics = dict(steps=run.step, total_steps=run.total_steps, epochs_done=run.step / run.steps_per_epoch,
                   history=run.history, config=asdict(cfg), world_size=run.world, **run.about())
    done = run.history and run.history[-1]["step"] == run.step
    final = run.history[-1] if done else evaluate_now()
    metrics.update({k: v for k, v in final.items() if k.startswith("top1")})

    def export(out):
        export_weights(model, out / "final.safetensors")
        if isinstance(runner.method, torch.nn.Module) and len(runner.method.state_dict()):
            export_weights(runner.method, out / "method.safetensors", metadata=file_metadata(runner.method))

    return run.finish(metrics, replicas=model, export=export)  # the replicas must hold identical weights
