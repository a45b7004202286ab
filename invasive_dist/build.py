"""Builders: each component of a run made by one small function, then handed to whoever uses it.

    plan = resolve_batch(cfg, world_size, resumed_global_batch)   # global batch, split once
    data = build_data(cfg, acc, plan)                             # splits + the loaders asked for
    model, channels_last = build_model_on(cfg, plan.world, acc.device)
    opt = build_optimization(model, cfg.optim, cfg.train, plan.global_batch, data.steps_per_epoch)
    Trainer(cfg, acc, world, build_parts(cfg, acc, world)).fit()   # train.py: all of the above

``train`` builds all of them; ``cv`` scoring a fold builds the validation loader and a model;
``bench`` builds one loader (input) or a model and optimizer (model). The config object is never
changed: the per-device batch a loader uses comes from the :class:`BatchPlan`.

Global batch: per-device batch x processes x grad_accum, e.g. 32 x 8 GPUs x 2 = 512 images per
optimizer step. Elastic resume keeps the checkpoint's global batch on any number of processes
(see :func:`resolve_batch`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .data import Loader, LoaderSpec, Shard, build_loader
from .data.check import cached_check, check_data
from .data.kaggle import DataIndex, pseudo_index, split, train_index
from .errors import UserError
from .faults import NO_FAULTS, Faults
from .models import build_model

# Process counts listed in the "which process counts work" message: up to 8 nodes x 8 GPUs.
_MAX_LISTED_WORLD = 64


@dataclass(frozen=True)
class BatchPlan:
    per_device: int  # micro-batch of one process
    world: int  # processes
    accum: int  # micro-batches per optimizer step
    reason: str = ""  # how it was chosen, for the log

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world * self.accum

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.per_device} per device x {self.world} "
            f"process{'es' if self.world != 1 else ''} x "
            f"{self.accum} accumulation" + (f" ({self.reason})" if self.reason else "")
        )


def _worlds(ok) -> str:
    counts = [w for w in range(1, _MAX_LISTED_WORLD + 1) if ok(w)]
    return ", ".join(map(str, counts)) or "none"


def resolve_batch(cfg: Config, world: int, resumed_global: int | None = None) -> BatchPlan:
    """Split the global batch over ``world`` processes, once per run.

    The global batch G is ``data.global_batch_size`` if set, else the checkpoint's when resuming
    (``resumed_global``), else ``data.batch_size`` x processes x ``train.grad_accum``. Then:

    - ``train.grad_accum: auto``: the smallest accumulation that keeps the per-device batch at most
      ``data.batch_size`` (the memory bound), e.g. G=64, bound 32: 2 processes -> 32 x 2 x 1,
      1 process -> 32 x 1 x 2, 3 processes -> no exact split (64 is not a multiple of 3).
    - a fixed ``train.grad_accum``: the per-device batch is G / (processes x grad_accum); resuming
      on another process count without ``data.global_batch_size`` must keep ``data.batch_size``.

    No exact split is a UserError that lists the process counts that work."""
    d, accum = cfg.data, cfg.train.grad_accum
    if d.global_batch_size and resumed_global and d.global_batch_size != resumed_global:
        raise UserError(
            f"the checkpoint was trained with global batch {resumed_global}, this run sets "
            f"data.global_batch_size={d.global_batch_size}: keep the checkpoint's global batch"
        )
    target = d.global_batch_size or resumed_global or 0
    if not target:
        a = 1 if accum == "auto" else accum
        return BatchPlan(d.batch_size, world, a)
    source = "data.global_batch_size" if d.global_batch_size else "the checkpoint's global batch size"
    if accum == "auto":
        if target % world:
            raise UserError(
                f"{source}={target} cannot be split over {world} processes (train.grad_accum=auto); "
                f"process counts that work: {_worlds(lambda w: target % w == 0)}"
            )
        per_process = target // world
        a = next(
            a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= d.batch_size
        )
        return BatchPlan(
            per_process // a, world, a, f"{source}, train.grad_accum=auto, at most {d.batch_size} per device"
        )
    if target % (world * accum):
        raise UserError(
            f"{source}={target} is not divisible by {world} processes x train.grad_accum={accum}; "
            f"process counts that work: {_worlds(lambda w: target % (w * accum) == 0)}"
            + ("; or set train.grad_accum=auto" if target % world == 0 else "")
        )
    per = target // (world * accum)
    if not d.global_batch_size and per != d.batch_size:
        raise UserError(
            f"the checkpoint was trained with global batch {resumed_global}, this run has "
            f"{d.batch_size * world * accum} = data.batch_size={d.batch_size} x {world} processes x "
            f"train.grad_accum={accum}: resume with the same batch_size x processes x grad_accum, or set "
            "train.grad_accum=auto (the per-device batch stays at most data.batch_size)"
        )
    return BatchPlan(per, world, accum, source)


def checked_index(cfg: Config, acc) -> DataIndex:
    """The labelled index after the data check (cached by file sizes and mtimes): refuse with the
    list of problems, or with ``data.on_bad_file=skip`` leave the bad images out. Collective."""
    d = cfg.data
    cache_dir = Path(cfg.output.root) / ".data-check"
    with acc.main_process_first():  # main checks and caches; the others read the cache
        if d.check_cache:
            report = cached_check(Path(d.root), d.labels_csv, cache_dir)
        else:
            report = check_data(Path(d.root), d.labels_csv)
    report.require("train", d.on_bad_file)
    index = train_index(d.root, d.labels_csv, d.limit)
    keep = [i for i, n in enumerate(index.names) if n not in report.bad_names]
    if len(keep) < len(index):
        if acc.is_main_process:
            for p in report.problems:
                if p.fatal and p.path_or_name in report.bad_names:
                    print(f"[data] data.on_bad_file=skip: leaving out {p.message}", file=sys.stderr)
        index = index.subset(keep)
    return index


@dataclass
class Data:
    train_idx: DataIndex  # training folds (+ pseudo-labelled test images)
    val_idx: DataIndex  # the validation fold
    train_loader: Loader | None  # None unless asked for
    val_loader: Loader | None  # None unless asked for
    steps_per_epoch: int  # optimizer steps: ceil(training images / global batch)

    def close(self) -> None:
        """Stop the loaders' worker processes now (cv's next fold would otherwise find them idle
        until garbage collection)."""
        for loader in (self.train_loader, self.val_loader):
            close = getattr(loader, "close", None)
            if close is not None:
                close()


def resolved_config(cfg: Config, plan: BatchPlan) -> Config:
    """The config as this run resolved it, for its ``config.yaml``: ``data.batch_size`` is the
    plan's per-device batch (``cfg`` itself is left alone)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=plan.per_device))


def channels_last_on(cfg: Config, device: torch.device) -> bool:
    return cfg.model.channels_last and torch.device(device).type == "cuda"


def build_data(
    cfg: Config, acc, plan: BatchPlan, train: bool = True, val: bool = True, faults: Faults = NO_FAULTS
) -> Data:
    """Splits (after the data check, pseudo-labels in the training folds only) and the loaders
    asked for. Collective (the data check). ``faults``: the run's fault hooks (tests)."""
    d = cfg.data
    full = checked_index(cfg, acc)
    train_idx, val_idx = split(full, d.n_folds, d.fold, cfg.split_seed)
    if d.pseudo_csv:
        # Pseudo-labelled test images join the training folds, never the validation fold.
        train_idx = train_idx.concat(pseudo_index(Path(d.root), Path(d.pseudo_csv)))
    # ceil(n / G): a function of the global batch only, so every split of G into processes x
    # batch x accum sees the same samples in each optimizer step (e.g. 100 images, G=32: 4 steps
    # whether 2 x 16 x 1 or 2 x 8 x 2; the last step wraps to the epoch's first 28 samples).
    steps = -(-len(train_idx) // plan.global_batch)
    train_loader = build_loader(loader_spec(cfg, acc, plan, train_idx, True, faults), d) if train else None
    # data_hang is a training worker's: the validation workers count their own samples, and their
    # prefetch of the next pass would reach the same count at a moment no test could name.
    val_loader = build_loader(loader_spec(cfg, acc, plan, val_idx, False), d) if val else None
    return Data(train_idx, val_idx, train_loader, val_loader, steps)


def loader_spec(
    cfg: Config, acc, plan: BatchPlan, index: DataIndex, train: bool, faults: Faults = NO_FAULTS
) -> LoaderSpec:
    """The spec of this rank's loader of ``index``: the plan's per-device batch and shard, the run's
    seed, the model's memory format; a training loader knows the epochs (DALI's look-ahead stops
    at the end of the last)."""
    return LoaderSpec.of(
        index,
        cfg.data,
        Shard(acc.process_index, plan.world, plan.accum),
        acc.device,
        train,
        cfg.seed,
        channels_last_on(cfg, acc.device),
        per_device=plan.per_device,
        epochs=cfg.train.epochs if train else None,
        faults=faults,
    )


def build_model_on(cfg: Config, world: int, device: torch.device) -> tuple[nn.Module, bool]:
    """The model with the same initial weights on every rank, SyncBatchNorm if asked, on the device
    in its memory format. Returns (model, channels_last)."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg.model)
    if cfg.train.sync_bn and world > 1 and torch.device(device).type != "cuda":
        raise UserError("train.sync_bn=true needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    if cfg.train.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = channels_last_on(cfg, device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return model, channels_last
