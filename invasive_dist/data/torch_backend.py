"""The torch backend: torchvision JPEG decoding in DataLoader workers, uint8 to the device,
normalization there (timm's prefetcher idea without the side stream).

Augmentation randomness comes from per-sample seeds (``base.sample_seeds``), never from worker
RNG state, so a batch is a pure function of (seed, epoch, rank, step): the same with 0 or 8
workers, and the same after a resume.

Workers: one DataLoader per loader for the loader's life (``persistent_workers``); each epoch's
batches come from a plan object (``_EpochPlan``) that the loader sets to (epoch, start step) before
iterating, so workers start once per loader, not once per epoch. They are started with
``forkserver``, never ``fork``: by the time a loader first iterates, the trainer has threads (gloo,
the TensorBoard writer, OpenMP, the watchdog), and a ``fork`` can copy a lock one of them holds into
the child, which then hangs before running a line (seen: 1 run in 6 of the 2-process demo on a
loaded 2-core machine). The forkserver is a fresh single-threaded process that imports this module
once; workers are forked from it. Measured on the 2-core CPU machine (load average ~6), 2 workers,
first batch of a loader: ``fork`` 0.1-0.2 s; ``forkserver`` 5.5-8 s for the process's first loader
(starting the server: importing torch and torchvision), 0.2 s for every later one; ``spawn`` 7-11 s
for every loader (each worker imports torch). Only the trainer's main process turns SIGTERM into a
checkpoint: a worker ends by itself ``WORKER_SIGNAL_GRACE_S`` (25 s) after a SIGTERM/SIGUSR1, time
for its rank to finish the step and save (see ``_worker_init``); the forkserver ignores both.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import forkserver

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..faults import NO_FAULTS, Faults
from .base import (
    Batch,
    ImageSpec,
    LoaderBase,
    LoaderSpec,
    eval_plan,
    normalize_on_device,
    sample_seeds,
    train_plan,
    train_steps,
)
from .kaggle import DataIndex

# Decoding and geometry live in .transforms (shared with dali and gpu_cache); these names stay
# importable from here.
from .transforms import decode_rgb, eval_transform, random_resized_crop_params, train_transform

__all__ = [
    "TorchConfig",
    "TorchLoader",
    "decode_rgb",
    "eval_transform",
    "random_resized_crop_params",
    "train_transform",
]

START_METHOD = "forkserver"


@dataclass
class TorchConfig:
    """``data.torch``: the torch backend's settings."""

    num_workers: int = 2  # decoding worker processes per rank (0 = decode in the training process)

    def problems(self) -> list[str]:
        return [f"data.torch.num_workers={self.num_workers} must be >= 0"] if self.num_workers < 0 else []


class _ImageDataset(Dataset):
    """Item = (position, augmentation seed or -1 for the eval transform)."""

    def __init__(self, index: DataIndex, image: ImageSpec, faults: Faults) -> None:
        self.paths = index.paths
        self.labels = index.labels
        self.image = image
        self.faults = faults  # each worker holds its own copy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        pos, seed = item
        self.faults.data_item()
        img = decode_rgb(self.paths[pos])
        m = self.image
        if seed < 0:
            img = eval_transform(img, m.size, m.eval_crop_pct, m.eval_geometry)
        else:
            img = train_transform(img, m.size, m.scale_min, m.hflip, m.vflip, m.rot90, seed)
        return img, int(self.labels[pos]), pos


def _collate(items):
    imgs, labels, pos = zip(*items)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.float32), torch.tensor(pos)


# A worker outlives a SIGTERM/SIGUSR1 by this long, then ends by itself (see _worker_init): longer
# than the trainer needs to reach its step boundary (watchdog.SIGNAL_GRACE_S, 20 s, bounds a rank
# blocked in one wait after a signal), shorter than the 30 s after which torchrun and Slurm
# (KillWait's default) SIGKILL what is left.
WORKER_SIGNAL_GRACE_S = 25
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _end_later(signum, frame) -> None:
    """A worker's SIGTERM/SIGUSR1: SIGALRM's default action ends it after the grace, whatever it
    is doing then (stuck in a decode, asleep); a second signal does not postpone the end."""
    left = signal.alarm(0)  # cancels a scheduled end and returns its seconds left (0: none)
    signal.alarm(left or _worker_grace_s)


_worker_grace_s = WORKER_SIGNAL_GRACE_S  # set per worker by _worker_init


def _worker_init(grace_s: int, worker_id: int) -> None:
    """Signals in a decoding worker. A SIGTERM/SIGUSR1 ends it ``grace_s`` seconds later, not at
    once: Slurm sends SIGTERM to every process of the job step and torchrun to each rank's whole
    process group, so the trainer and its workers get it together; a worker that died at once would
    take with it the batch its rank is waiting for, and the rank could not reach the step boundary
    where it saves (seen: the requeue and SIGTERM tests lost their stop-step checkpoint on a loaded
    machine). Within the grace the rank finishes its step, saves and exits, and its DataLoader stops
    the workers; a worker that nobody stops (its rank gone, itself stuck) still ends by itself.
    The trainer's own handler (which only sets a flag) is never inherited: workers are forked
    from the forkserver, not from the trainer. SIGINT keeps its default (Ctrl-C ends everything)."""
    del worker_id
    global _worker_grace_s
    _worker_grace_s = grace_s
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _end_later)


def _start_forkserver_shielded() -> None:
    """Start the forkserver with SIGTERM/SIGUSR1 ignored, a disposition a process keeps across exec:
    the server is in the rank's process group, and if a launcher's group-wide SIGTERM ended it, its
    workers would stop serving (they end when their parent does) while the rank still needs a
    batch to reach its step boundary. It ends when the rank does (it watches a pipe from the rank).
    A stop signal that arrives in the few milliseconds of this start is lost; that happens while
    loaders are built, before the trainer handles signals."""
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()  # signal handlers can only be changed from the main thread
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of the decoding workers (see the module docstring): forkserver, whose
    server is a fresh single-threaded process that imports this module once."""
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Replaces the default preload (``__main__``): the workers need this module, not the CLI.
        ctx.set_forkserver_preload([__name__])
        _start_forkserver_shielded()
    return ctx


class _EpochPlan(Sampler):
    """The batch sampler of a loader's one DataLoader: the batches (items of ``_ImageDataset``) of
    the epoch and start step the loader last set. Iterated in the main process, so a new plan
    reaches the persistent workers with the next indices."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class TorchLoader(LoaderBase):
    """One split, one rank: ``iter_epoch`` yields device batches in the plan's order.

    One DataLoader for the loader's life; with ``num_workers > 0`` its workers start at the first
    ``iter_epoch`` and stay (``persistent_workers``) until :meth:`close` or garbage collection."""

    def __init__(self, spec: LoaderSpec, cfg: TorchConfig) -> None:
        super().__init__(spec)
        workers = cfg.num_workers
        # Data faults are the decoding workers' (a test's data_hang); in-process decoding has none.
        self.dataset = _ImageDataset(self.index, self.image, spec.faults if workers else NO_FAULTS)
        if self.train:
            self.steps_per_epoch = train_steps(self.n, self.batch, self.shard)
        else:
            self.steps_per_epoch = len(eval_plan(self.n, self.batch, self.shard))
        self.sampler = _EpochPlan()
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            worker_init_fn=functools.partial(_worker_init, WORKER_SIGNAL_GRACE_S) if workers else None,
            multiprocessing_context=worker_context() if workers else None,
        )

    def _plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        if not self.train:
            return [
                [(int(p), -1) for p in step] for step in eval_plan(len(self.index), self.batch, self.shard)
            ]
        plan = train_plan(len(self.index), self.batch, self.shard, self.seed, epoch)
        steps = []
        for s, positions in enumerate(plan):
            # The seed of a sample depends on its slot, so a sample drawn twice (wrap padding)
            # gets two different augmentations.
            slots = positions.astype(np.int64) + np.int64(len(self.index)) * (
                s * self.batch + np.arange(len(positions))
            )
            seeds = sample_seeds(self.seed, epoch, self.shard.rank, slots)
            steps.append([(int(p), int(sd)) for p, sd in zip(positions, seeds)])
        return steps

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.sampler.steps = self._plan(epoch)[start_step:]
        if not len(self.sampler):
            return
        # A new iterator of a persistent DataLoader reuses its workers; one left unfinished (a stop
        # mid-epoch) is drained by DataLoader's reset first.
        for imgs, labels, pos in self.loader:
            yield Batch(
                images=normalize_on_device(imgs, self.device, self.channels_last),
                labels=labels.to(self.device, non_blocking=True),
                index=pos.to(self.device, non_blocking=True),
            )

    def close(self) -> None:
        """Stop the workers now (they also stop when the loader is garbage collected)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
