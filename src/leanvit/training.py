"""What every training shares: processes, seeding, data shards, per-epoch loaders, the schedule
and the resumable checkpoint of a run (:class:`Run`), and evaluation and export helpers.

Resumable: a checkpoint (model, optimizer, step, RNG state) is written atomically every
``save_every`` steps and at the end of every epoch; restarting the same command continues from
it. The data order is a seeded permutation per epoch and every image's augmentation is seeded
by (seed, epoch, index), so a resumed run sees exactly the batches the uninterrupted run would.
Under ``torchrun`` it trains data-parallel (DDP: gloo on CPU, nccl on GPU with one process per
GPU, cuda:LOCAL_RANK), each process on its shard of every epoch's permutation. ``cfg.device`` and
``cfg.amp`` say where and at what precision (:mod:`leanvit.device`): :func:`fit` moves every batch
there and runs the steps and evaluations under autocast.

Every training is a :class:`Run` and one :func:`fit` call with its own step and evaluation:
``train`` (supervised, :class:`Supervised`; PRANCE's meta-network, ``train_prance.MetaNetwork``),
``train_policy`` (RL4EViT's agents) and ``train_prance.train_selector`` (PRANCE's selector).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .data import balanced_subset, collate, eval_transform, load_dataset, make_loader
from .device import DeviceError, all_gather, all_max, all_sum, autocast, check_amp, init_distributed, pin_memory, \
    select_device
from .provenance import write_json
from .runtime import adapt


# --- data -------------------------------------------------------------------------------------
def train_transform(cfg: dict):
    """Crop+flip augmentation at the model's input size: pad-and-crop for small images (CIFAR),
    timm's random-resized-crop pipeline otherwise."""
    import torchvision.transforms as T
    from timm.data import create_transform
    size = cfg["input_size"][-1]
    if size <= 64:
        return T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(cfg["mean"], cfg["std"])])
    return create_transform(cfg["input_size"], is_training=True, mean=cfg["mean"], std=cfg["std"],
                            interpolation=cfg.get("interpolation", "bicubic"), hflip=0.5)


class SeededAugment(Dataset):
    """Applies the dataset's random transform with a seed of (seed, epoch, index), so batches are
    the same whether a run was interrupted or not, and whatever worker loads them."""

    def __init__(self, base, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
            return self.base[i]


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int, batch: int) -> list:
    """This process's share of the epoch's permutation, cut to whole batches on every process."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    per_rank = (n // world) // batch * batch
    return perm[rank::world][:per_rank]


# --- schedule, checkpoints ------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _plain(value):
    """``value`` with tuples as lists and paths as strings: what weights_only loading gives back,
    so a saved configuration compares equal to the running one."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def atomic_save(obj, path: Path) -> None:
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into ``path.tmp``, then rename it over ``path``: the old file stays whole until the
    new one is. A failed write (a full disk: torch reports it as a RuntimeError) removes the
    temporary file and is one OSError naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # also an interrupt: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or not isinstance(e, Exception):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OSError(f"could not write {path} ({type(e).__name__}: {first}); {path.name} is unchanged") from e


def _rng_state() -> dict:
    """The RNG states as tensors, ints and lists only, so a checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    cuda = dict(cuda=torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else {}
    return dict(torch=torch.get_rng_state(), **cuda,
                numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached=float(cached)),
                python=dict(version=version, internal=list(internal), gauss=gauss))


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class CheckpointError(ValueError):
    """A resume checkpoint that cannot be used; the message names the file and the way out."""


def load_checkpoint(path: Path) -> dict:
    """A resume checkpoint, read with ``weights_only=True``: tensors, numbers, strings and containers
    only, so a planted or tampered file cannot run code. Anything else is a :class:`CheckpointError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, unpickling refused, EOF, ...: all mean "not usable"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path} is corrupt or not a leanvit checkpoint ({type(err).__name__}: {first}); "
                              "remove it, or pass --restart to start the run over") from err
    if not isinstance(ckpt, dict) or not {"config", "rng"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a leanvit resume checkpoint; remove it, or pass --restart")
    return ckpt


HOLDOUT = "holdout"  # eval_split: a class-balanced slice of the training split, never trained on
HOLDOUT_IMAGES = 1000  # its size when limit_eval is not given
# every training's eval_split: what it is evaluated on by default is never the test split
EVAL_SPLIT_HELP = ("where the training is evaluated (and a policy's budget checked and calibrated): 'holdout' "
                   "(default), --limit-eval images (default 1000) of the training split, class-balanced and never "
                   "trained on; or a split name: 'test' evaluates on test images (recorded in metrics.json; do not "
                   "select or tune on it)")


def holdout_split(cfg, num_classes: int, train_tf, eval_tf):
    """(training images, held-out images), disjoint, both from ``cfg.train_split``: what policy
    trainings select, calibrate and check budgets on, so that they never tune on the test set."""
    held_n = cfg.limit_eval or HOLDOUT_IMAGES
    total = None if cfg.limit_train is None else cfg.limit_train + held_n
    both = load_dataset(cfg.data, split=cfg.train_split, num_classes=num_classes, limit=total, seed=cfg.seed)
    if len(both) <= held_n:
        raise ValueError(f"the {cfg.train_split} split has {len(both)} images: too few to hold out {held_n} "
                         "for evaluation (--limit-eval) and train on the rest")
    held = set(balanced_subset(both.targets, held_n, cfg.seed + 1))
    rest = [i for i in range(len(both)) if i not in held]
    return both.subset(rest, train_tf), both.subset(sorted(held), eval_tf).for_evaluation()


# --- what every training loop shares -----------------------------------------------------------------
class Run:
    """Processes, seeding, data shards, per-epoch loaders, the progress (``step``, ``history``)
    and the resumable checkpoint of a run; ``log`` prints on process 0 only.

    The trainings differ only in what one step does, what they evaluate and what the checkpoint
    holds; everything here is the same for all.
    """

    # may change between a run and its resume
    RESUME_FREE = ("max_steps", "workers", "save_every", "max_epochs", "calibrate", "device")

    def __init__(self, cfg, log: Callable[[str], None] = print):
        for name in ("epochs", "batch_size", "save_every", "max_steps"):  # 0 would mean "all" or divide by 0
            value = getattr(cfg, name, None)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.cfg, self.config = cfg, asdict(cfg)
        self.device, self.amp = select_device(getattr(cfg, "device", None)), getattr(cfg, "amp", "off")
        check_amp(self.device, self.amp)
        if self.amp == "fp16":
            raise DeviceError("--amp fp16: leanvit's trainings have no loss scaling, which fp16 gradients need; "
                              "use --amp bf16")
        self.rank, self.world = init_distributed(self.device)
        self.device_ids = [self.device.index] if self.device.type == "cuda" else None  # DDP's: one GPU per process
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda line: None)
        self.step, self.history = 0, []
        self.saved_at = None  # the step of the last checkpoint written
        self.out = Path(cfg.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # before the model is built: random inits are seeded too
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if self.world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // self.world))
        self.state_path = self.out / "last.pt"
        self.t0 = time.time()
        self.unreadable = {"train": set(), "eval": set()}  # images the loaders skipped, by path

    def setup_data(self, model) -> None:
        cfg = self.cfg
        train_tf, eval_tf = train_transform(eval_transform_cfg(model)), eval_transform(model)
        if cfg.eval_split == HOLDOUT:
            self.train_set, self.eval_set = holdout_split(cfg, model.num_classes, train_tf, eval_tf)
        else:
            self.train_set = load_dataset(cfg.data, split=cfg.train_split, transform=train_tf,
                                          num_classes=model.num_classes, limit=cfg.limit_train, seed=cfg.seed)
            self.eval_set = load_dataset(cfg.data, split=cfg.eval_split, transform=eval_tf,
                                         num_classes=model.num_classes, limit=cfg.limit_eval, seed=cfg.seed)
        from .data import check_classes, model_label_names
        check_classes(self.train_set.classes, model_label_names(model), self.train_set.root, strict=False)
        self.per_rank = cfg.batch_size // self.world
        if self.per_rank < 1 or cfg.batch_size % self.world:
            raise ValueError(f"batch size {cfg.batch_size} must be a multiple of the {self.world} processes")
        self.steps_per_epoch = (len(self.train_set) // self.world) // self.per_rank
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training images are fewer than one batch of {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        self.eval_loader = _Noting(make_loader(_shard(self.eval_set, self.rank, self.world), batch_size=250,
                                               num_workers=0, pin_memory=pin_memory(self.device)),
                                   self.unreadable["eval"])
        self._augmented = SeededAugment(self.train_set, cfg.seed)

    def about(self) -> dict:
        """For metrics.json: what the run's evaluations were measured on, and its provenance."""
        from .data import resolve_data
        from .provenance import provenance
        cfg = self.cfg
        where = (f"{len(self.eval_set)} held-out images of the {cfg.train_split} split (never trained on)"
                 if cfg.eval_split == HOLDOUT else f"the {cfg.eval_split} split ({len(self.eval_set)} images)")
        return dict(evaluated_on=where, skipped_folders=self.train_set.skipped_folders, provenance=provenance(
            model=cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained, data=resolve_data(cfg.data),
            split=cfg.train_split, limit=cfg.limit_train, seed=cfg.seed))

    def epoch_loader(self, step: int) -> DataLoader:
        """The rest of the epoch that ``step`` falls in, for this process."""
        epoch, skip = divmod(step, self.steps_per_epoch)
        self._augmented.epoch = epoch
        idx = epoch_indices(len(self.train_set), self.cfg.seed, epoch, self.rank, self.world, self.per_rank)
        return DataLoader(Subset(self._augmented, idx[skip * self.per_rank:]), batch_size=self.per_rank,
                          shuffle=False, drop_last=True, collate_fn=collate, num_workers=self.cfg.workers,
                          pin_memory=pin_memory(self.device),
                          generator=torch.Generator().manual_seed(self.cfg.seed))  # leaves the global RNG alone

    def epoch_done(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def should_save(self, step: int) -> bool:
        """Every ``save_every`` steps; at an epoch's end the loop saves after its evaluation."""
        return step % self.cfg.save_every == 0 and not self.epoch_done(step)

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)

    def load(self) -> Optional[dict]:
        """The checkpoint to resume from, or None: RNG, ``step`` and ``history`` restored; refuses
        another configuration."""
        if not self.state_path.is_file():
            return None
        ckpt = load_checkpoint(self.state_path)
        saved = {k: v for k, v in ckpt["config"].items() if k not in self.RESUME_FREE}
        mine = {k: v for k, v in _plain(self.config).items() if k not in self.RESUME_FREE}
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            raise CheckpointError(f"{self.state_path} was written by a different configuration {diff}; "
                                  "use another --out, or pass --restart to start over")
        _set_rng_state(ckpt["rng"])
        self.t0 = time.time() - ckpt.get("elapsed_s", 0.0)  # wall time counts across resumes
        self.step, self.history, self.saved_at = ckpt["step"], ckpt["history"], ckpt["step"]
        for k, paths in ckpt.get("unreadable", {}).items():
            self.unreadable.setdefault(k, set()).update(paths)
        return ckpt

    def save(self, **state) -> None:
        """The checkpoint: ``state`` (weights, optimizers, ...) with the step and history."""
        if self.is_main:
            atomic_save(dict(state, step=self.step, history=self.history, config=_plain(self.config),
                             unreadable={k: sorted(v) for k, v in self.unreadable.items()},
                             rng=_rng_state(), elapsed_s=time.time() - self.t0), self.state_path)
        self.saved_at = self.step

    def record(self, epoch: int, fields: dict) -> None:
        """A history record: the epoch, the step, ``fields`` and the wall time; logged."""
        self.history.append(dict(epoch=epoch, step=self.step, **fields, elapsed_s=self.elapsed()))
        self.log(json.dumps(self.history[-1]))

    def progress(self, desc: str) -> tqdm:
        return tqdm(total=self.stop_at, initial=min(self.step, self.stop_at), desc=desc, unit="step",
                    disable=not self.is_main, dynamic_ncols=True)

    def finish(self, metrics: dict, replicas: torch.nn.Module, export: Callable[[Path], None]) -> dict:
        """The end of every training: under torchrun the check that every process holds the same
        ``replicas``; process 0 exports (``export(out)``) and writes metrics.json; then a barrier, so
        that no process returns before they exist. Returns ``metrics``."""
        if self.world > 1:
            metrics["replica_max_abs_diff"] = _replica_diff(replicas)
        unreadable = {k: sorted(set().union(*all_gather(sorted(v)))) for k, v in self.unreadable.items()}
        metrics["skipped_images"] = dict({k: len(v) for k, v in unreadable.items()},
                                         paths=sorted(set().union(*unreadable.values()))[:20])
        if self.is_main:
            export(self.out)
            write_json(self.out / "metrics.json", metrics)
        if dist.is_initialized():
            dist.barrier()
        return metrics


def fit(run: Run, desc: str, step: Callable, evaluate: Callable[[int, dict, int], dict],
        state: Callable[[], dict], restore: Callable[[dict], None], first: Optional[Callable[[], dict]] = None,
        evaluate_at_stop: bool = False, extend: Optional[Callable[[], bool]] = None) -> None:
    """The epoch loop of every training, resumable; ``run.step`` and ``run.history`` say where it ended.

    Resumes from the run's checkpoint if there is one (``restore(checkpoint)`` loads what
    ``state()`` returned), then calls ``step(batch, i)`` for every batch, ``i`` the step before it,
    up to ``run.stop_at``. ``step`` returns what it logs: numbers are summed over the epoch (their
    running means shown in the progress bar), strings shown as they are. At every epoch's end, and
    at an early stop too with ``evaluate_at_stop``, ``evaluate(epoch, sums, n)`` gives the fields of
    the epoch's history record (``epoch`` from 0; ``sums`` of the numbers of ``n`` steps, n >= 1);
    ``first()``, if given, those of a record before any training. A checkpoint is written every
    ``save_every`` steps, after every record and at the end. When the planned steps are done,
    ``extend()`` may move ``run.stop_at`` on and return True to train on.
    """
    with autocast(run.device, run.amp):  # the steps and evaluations (fp32 weights and optimizer)
        ckpt = run.load()
        if ckpt:
            restore(ckpt)
            run.log(f"resumed from {run.state_path} at step {run.step}/{run.total_steps}")
        if first is not None and run.step == 0 and not run.history:
            run.record(0, first())
        with run.progress(desc) as bar:  # closed on an error too: the error is the last line printed

            def more() -> bool:
                if extend is None or not extend():
                    return False
                bar.total, bar.n = run.stop_at, run.step
                bar.refresh()
                return True

            while run.step < run.stop_at or more():
                epoch = run.step // run.steps_per_epoch
                sums, n = {}, 0
                for batch in run.epoch_loader(run.step):
                    run.unreadable["train"].update(batch.skipped)
                    logged = step(batch.to(run.device, non_blocking=True), run.step)
                    run.step += 1
                    n += 1
                    for k, v in logged.items():
                        if not isinstance(v, str):
                            sums[k] = sums.get(k, 0.0) + v
                    bar.update()
                    bar.set_postfix(epoch=epoch, **{k: v if isinstance(v, str) else f"{sums[k] / n:.3f}"
                                                    for k, v in logged.items()})
                    if run.should_save(run.step):
                        run.save(**state())
                    if run.step >= run.stop_at:
                        break
                if run.epoch_done(run.step) or (evaluate_at_stop and run.step >= run.stop_at):
                    run.record(epoch + 1, evaluate(epoch, sums, max(n, 1)))
                    run.save(**state())
        if run.saved_at != run.step:
            run.save(**state())


# --- evaluation, export ------------------------------------------------------------------------------
def evaluate_top1(runner, loader) -> float:
    """Top-1 (%) of ``runner`` on ``loader`` (every process's images); leaves it in training mode."""
    from .evaluate import evaluate
    top1 = evaluate({"runner": runner}, loader, desc=None, reference=None, warmup=False)["runner"].top1
    runner.train()
    return top1


class _Noting:
    """A loader whose batches add the paths of the images they skipped (unreadable) to ``seen``."""

    def __init__(self, loader, seen: set):
        self.loader, self.seen = loader, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen.update(batch.skipped)
            yield batch

    def __len__(self):
        return len(self.loader)


def average_gradients(parameters, world: int) -> None:
    """Average the gradients of ``parameters`` over the ``world`` processes (alone: nothing to do)."""
    if world > 1:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def distill_loss(logits, teacher, images):
    """KL(student || teacher) on the class distributions, batch mean."""
    with torch.no_grad():
        target = F.log_softmax(teacher(images), dim=-1)
    return F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean", log_target=True)


class Supervised:
    """What ``leanvit train`` does with a method: adapt the model to it, step on cross-entropy
    (plus the method's own term and the distillation term) and evaluate top-1. PRANCE's
    meta-network training changes it (``train_prance.MetaNetwork``)."""

    first = False  # True: a history record (epoch 0) before any training

    def __init__(self, cfg):
        self.cfg = cfg

    def adapt(self, model, fresh: bool):
        """The runner to train; ``fresh``: no checkpoint to resume from."""
        return adapt(model, self.cfg.method, **self.cfg.options)

    def loss(self, net, runner, batch, teacher, step: int) -> Tensor:
        """One batch's loss, backwarded; ``net``: ``runner`` or its DDP wrapper."""
        cfg = self.cfg
        logits = net(batch.images)
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=cfg.label_smoothing)
        extra = runner.method.extra_loss()  # e.g. DynamicViT's keep ratio
        if extra is not None:
            loss = loss + extra
        if teacher is not None:
            loss = loss + cfg.distill * distill_loss(logits, teacher, batch.images)
        loss.backward()
        return loss

    def evaluate(self, runner, loader) -> dict:
        return dict(top1=evaluate_top1(runner, loader))


def _shard(dataset, rank, world):
    return dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))


def _replica_diff(model) -> float:
    """Largest difference between any process's weights and process 0's. BatchNorm statistics are
    local to each process after its last step; DDP takes process 0's (it broadcasts them at every
    forward), so they are synced first and the check is on the parameters."""
    for b in model.buffers():
        dist.broadcast(b, src=0)
    worst = 0.0
    for p in model.state_dict().values():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        if p.numel():
            worst = max(worst, float((ref - p).abs().max()))
    return all_max([worst])[0]


def eval_transform_cfg(model) -> dict:
    from timm.data import resolve_data_config
    return resolve_data_config({}, model=model)


def export_weights(model, path: Path, half: bool = False, metadata: Optional[dict] = None) -> None:
    """Weights as safetensors (fp16 if ``half``), written atomically; ``metadata``: str -> str."""
    from safetensors.torch import save_file
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    _write_atomically(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))
