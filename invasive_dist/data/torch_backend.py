"""The torch backend: torchvision JPEG decoding in DataLoader workers, uint8 to the device,
normalization there (timm's prefetcher idea without the side stream).

Augmentation randomness comes from per-sample seeds (``base.sample_seeds``), never from worker
RNG state, so a batch is a pure function of (seed, epoch, rank, step): the same with 0 or 8
workers, and the same after a resume.

Units, not batches. A worker decodes a *unit*: ``ceil(batch / num_workers)`` consecutive samples
of one step's plan (``_Plan.units``), and the main process puts the units of a step together into the
batch (``_assemble``: each unit copied into its rows of the device batch, then one normalization).
Handing each worker a whole batch left workers idle whenever the epoch had fewer steps than there
were workers (Kaggle folds: 1,836 images at batch 256 are 8 steps, so 8 of 16 workers worked) and
made the first batch of every epoch wait for one worker to decode all of it alone (~3-4 s of 256
full-size JPEGs); with units every worker decodes a part of every batch.

One stream across epochs. One DataLoader per loader for its life (``persistent_workers``) and one
iterator of it for as long as the consumer asks for the batches in the order the loader expects:
its batch sampler (``_Stream``) hands out the units of (epoch, step), then of the next step, and
for a training loader on into the next epoch (up to the spec's ``epochs`` when that is set), so
while the last batches of an epoch are trained and the evaluation runs, the workers already decode
the next epoch's first units (``prefetch_factor`` x workers units in flight, 4 batches), as the
DALI loader does. Asked for another batch than the next one (a resume, a repeated or abandoned
epoch, a new evaluation), the loader starts a new stream there: the DataLoader's reset waits for the
units in flight and drops them (counted in ``wasted``), and ``restarts`` counts the new streams.
Measured on real-size synthetic JPEGs: docs/performance.md ("The torch backend on CPU").

Workers are started with ``forkserver``, never ``fork``: by the time a loader first iterates, the
trainer has threads (gloo, the TensorBoard writer, OpenMP, the watchdog), and a ``fork`` can copy a
lock one of them holds into the child, which then hangs before running a line (seen: 1 run in 6 of
the 2-process demo on a loaded 2-core machine). The forkserver is a fresh single-threaded process
that imports this module once; workers are forked from it. Measured on the 2-core CPU machine (load
average ~6), 2 workers, first batch of a loader: ``fork`` 0.1-0.2 s; ``forkserver`` 5.5-8 s for the
process's first loader (starting the server: importing torch and torchvision), 0.2 s for every
later one; ``spawn`` 7-11 s for every loader (each worker imports torch). Forkserver children run
the main script's top level again: ``workers.check_main_script`` refuses, before they start, a
script whose call is not under ``if __name__ == "__main__":`` and code read from standard input.
They die with their rank (``workers.tie_to_rank``, ``workers.forkserver_tied``). Only the trainer's
main process turns SIGTERM into a checkpoint: a worker ends by itself ``WORKER_SIGNAL_GRACE_S``
(25 s) after a SIGTERM/SIGUSR1, time for its rank to finish the step and save (see
``_worker_init``); the forkserver ignores both.
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
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .. import workers
from ..faults import NO_FAULTS, Faults
from .base import (
    Batch,
    ImageSpec,
    LoaderBase,
    LoaderSpec,
    eval_plan,
    mean_std,
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
PREFETCH_FACTOR = 4  # units in flight per worker: with units of batch / workers, 4 batches ahead


@dataclass
class TorchConfig:
    """``data.torch``: the torch backend's settings."""

    num_workers: int = 2  # decoding worker processes per rank (0 = decode in the training process)

    def problems(self) -> list[str]:
        return [f"data.torch.num_workers={self.num_workers} must be >= 0"] if self.num_workers < 0 else []


@dataclass(frozen=True)
class _Unit:
    """What one worker decodes at a time: part ``part`` of ``parts`` of the batch of (epoch, step),
    the samples at ``positions`` with their augmentation seeds (-1: the eval transform)."""

    epoch: int
    step: int
    part: int
    parts: int
    positions: np.ndarray  # int64 positions in the DataIndex
    seeds: np.ndarray  # int64


class _ImageDataset(Dataset):
    """Item = (position, augmentation seed or -1 for the eval transform); the DataLoader asks for a
    whole :class:`_Unit` at once (``__getitems__``) and gets ((epoch, step, part, parts), uint8
    images)."""

    def __init__(self, index: DataIndex, image: ImageSpec, faults: Faults) -> None:
        self.paths = index.paths
        self.labels = index.labels
        self.image = image
        self.faults = faults  # each worker holds its own copy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        pos, seed = item
        self.faults.data_item()
        img = decode_rgb(self.paths[pos])
        m = self.image
        if seed < 0:
            return eval_transform(img, m.size, m.eval_crop_pct, m.eval_geometry)
        return train_transform(img, m.size, m.scale_min, m.hflip, m.vflip, m.rot90, seed)

    def __getitems__(self, unit: _Unit):
        # default_collate stacks into shared memory in a worker: the unit crosses to the rank uncopied.
        images = default_collate([self[(int(p), int(s))] for p, s in zip(unit.positions, unit.seeds)])
        return (unit.epoch, unit.step, unit.part, unit.parts), images


def _as_is(unit_out):
    """The DataLoader's collate function: ``__getitems__`` already stacked the unit."""
    return unit_out


# A worker outlives a SIGTERM/SIGUSR1 by this long, then ends by itself (see _worker_init): longer
# than the trainer needs to reach its step boundary (watchdog.SIGNAL_GRACE_S, 20 s, bounds a rank
# blocked in one wait after a signal), shorter than the 30 s after which torchrun and Slurm
# (KillWait's default) SIGKILL what is left.
WORKER_SIGNAL_GRACE_S = 25
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _end_later(signum, frame) -> None:
    """A worker's SIGTERM/SIGUSR1/SIGINT: SIGALRM's default action ends it after the grace, whatever it
    is doing then (stuck in a decode, asleep); a second signal does not postpone the end."""
    left = signal.alarm(0)  # cancels a scheduled end and returns its seconds left (0: none)
    signal.alarm(left or _worker_grace_s)


_worker_grace_s = WORKER_SIGNAL_GRACE_S  # set per worker by _worker_init


def _worker_init(grace_s: int, worker_id: int) -> None:
    """A decoding worker's start: it dies with its rank (``workers.tie_to_rank``: no worker outlives
    a rank that was SIGKILLed or ended by the watchdog), and signals. A SIGTERM/SIGUSR1 ends it
    ``grace_s`` seconds later, not at once: Slurm sends SIGTERM to every process of the job step and
    torchrun to each rank's whole process group, so the trainer and its workers get it together; a
    worker that died at once would take with it the batch its rank is waiting for, and the rank
    could not reach the step boundary where it saves (seen: the requeue and SIGTERM tests lost
    their stop-step checkpoint on a loaded machine). Within the grace the rank finishes its step,
    saves and exits, and its DataLoader stops the workers; a worker that nobody stops (itself
    stuck) still ends by itself. The trainer's own handler (which only sets a flag) is never
    inherited: workers are forked from the forkserver, not from the trainer. SIGINT likewise: a
    terminal's Ctrl-C reaches the whole foreground group, and a worker that died at once made its
    rank end on "DataLoader worker exited unexpectedly" (a traceback, exit 1) instead of Ctrl-C's
    own line and 130 (seen in CI); the rank's KeyboardInterrupt ends it, and its workers with it."""
    del worker_id
    workers.tie_to_rank()
    global _worker_grace_s
    _worker_grace_s = grace_s
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for sig in (*_STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, _end_later)


def _start_forkserver_shielded() -> None:
    """Start the forkserver with SIGTERM/SIGUSR1 ignored, a disposition a process keeps across exec:
    the server is in the rank's process group, and if a launcher's group-wide SIGTERM ended it, its
    workers would stop serving (they end when their parent does) while the rank still needs a
    batch to reach its step boundary. It ends when the rank does (``workers.forkserver_tied``).
    A stop signal that arrives in the few milliseconds of this start is lost; that happens while
    loaders are built, before the trainer handles signals."""
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()  # signal handlers can only be changed from the main thread
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        with workers.forkserver_tied():
            forkserver.ensure_running()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of the decoding workers (see the module docstring): forkserver, whose
    server is a fresh single-threaded process that imports this module once. Refuses a main script
    that the workers would run again (``workers.check_main_script``)."""
    workers.check_main_script()
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Replaces the default preload (``__main__``): the workers need this module, not the CLI;
        # ``workers`` first, so that the server dies with the rank from its first milliseconds.
        ctx.set_forkserver_preload([workers.__name__, __name__])
        _start_forkserver_shielded()
    return ctx


class _Plan:
    """A loader's batches as units, and the stream of them from a given batch on. Holds no
    reference to the loader or its DataLoader (the DataLoader's sampler holds a stream of it), so
    a dropped loader stops its workers at once, not at the next garbage collection."""

    def __init__(self, spec: LoaderSpec, steps_per_epoch: int, unit: int) -> None:
        self.n, self.batch, self.shard, self.seed = len(spec.index), spec.batch, spec.shard, spec.seed
        self.train, self.epochs = spec.train, spec.epochs  # a training stream stops after ``epochs``
        self.steps_per_epoch, self.unit = steps_per_epoch, unit
        self._eval = None if spec.train else eval_plan(self.n, self.batch, self.shard)
        self._train: dict[int, np.ndarray] = {}
        self.sent = 0  # units handed to the DataLoader by the current stream

    def positions(self, epoch: int, step: int) -> np.ndarray:
        if self._eval is not None:
            return self._eval[step]
        if epoch not in self._train:
            if len(self._train) > 2:  # the stream is in at most the consumer's epoch and the next
                self._train.pop(min(self._train))
            self._train[epoch] = train_plan(self.n, self.batch, self.shard, self.seed, epoch)
        return self._train[epoch][step]

    def units(self, epoch: int, step: int) -> list[_Unit]:
        positions = self.positions(epoch, step).astype(np.int64)
        if self.train:
            # The seed of a sample depends on its slot, so a sample drawn twice (wrap padding)
            # gets two different augmentations.
            slots = positions + np.int64(self.n) * (step * self.batch + np.arange(len(positions)))
            seeds = sample_seeds(self.seed, epoch, self.shard.rank, slots).astype(np.int64)
        else:
            seeds = np.full(len(positions), -1, dtype=np.int64)
        u = self.unit
        starts = range(0, len(positions), u)
        return [
            _Unit(epoch, step, k, len(starts), positions[a : a + u], seeds[a : a + u])
            for k, a in enumerate(starts)
        ]

    def after(self, key: tuple[int, int]) -> tuple[int, int] | None:
        """The batch after ``key`` in a stream: the next step, or the next epoch's first (training
        only, and not past ``epochs``)."""
        epoch, step = key
        if step + 1 < self.steps_per_epoch:
            return epoch, step + 1
        if self.train and (self.epochs is None or epoch + 1 < self.epochs):
            return epoch + 1, 0
        return None

    def stream_from(self, key: tuple[int, int] | None) -> Iterator[_Unit]:
        while key is not None:
            for unit in self.units(*key):
                self.sent += 1
                yield unit
            key = self.after(key)


class _Stream(Sampler):
    """The batch sampler of a loader's one DataLoader: the units of the stream the loader last
    started (``TorchLoader._start``). Iterated in the main process, a few units ahead of the
    consumer, so a new stream reaches the persistent workers with the next units."""

    def __init__(self) -> None:
        self.units: Iterator[_Unit] = iter(())

    def __iter__(self) -> Iterator[_Unit]:
        return self.units


class TorchLoader(LoaderBase):
    """One split, one rank: ``iter_epoch`` yields device batches in the plan's order.

    One DataLoader for the loader's life; with ``num_workers > 0`` its workers start at the first
    ``iter_epoch`` and stay (``persistent_workers``) until :meth:`close` or garbage collection.
    ``restarts`` counts the streams started (1 for a training run from its start to its end) and
    ``wasted`` the units decoded and dropped because a stream was left early."""

    def __init__(self, spec: LoaderSpec, cfg: TorchConfig) -> None:
        super().__init__(spec)
        n_workers = cfg.num_workers
        # Data faults are the decoding workers' (a test's data_hang); in-process decoding has none.
        self.dataset = _ImageDataset(self.index, self.image, spec.faults if n_workers else NO_FAULTS)
        if self.train:
            self.steps_per_epoch = train_steps(self.n, self.batch, self.shard)
        else:
            self.steps_per_epoch = len(eval_plan(self.n, self.batch, self.shard))
        # Every worker decodes a part of every batch; in-process, the unit is the batch.
        self.unit = -(-self.batch // n_workers) if n_workers else self.batch
        self.plan = _Plan(spec, self.steps_per_epoch, self.unit)
        self.stream = _Stream()
        self._it = None  # the DataLoader's iterator of the current stream
        self._next: tuple[int, int] | None = None  # the batch the stream delivers next (None: ended)
        self.restarts = self.wasted = self._received = 0
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.stream,
            num_workers=n_workers,
            collate_fn=_as_is,
            pin_memory=self.device.type == "cuda",
            persistent_workers=n_workers > 0,
            prefetch_factor=PREFETCH_FACTOR if n_workers else None,
            worker_init_fn=functools.partial(_worker_init, WORKER_SIGNAL_GRACE_S) if n_workers else None,
            multiprocessing_context=worker_context() if n_workers else None,
        )

    # ------------------------------------------------------------------------------------------
    # Taking batches.

    def _start(self, key: tuple[int, int]) -> None:
        """A new stream from ``key``; the units still in flight of the old one are dropped."""
        self._next = None  # until the reset below has finished
        self.wasted += self.plan.sent - self._received
        self.plan.sent = self._received = 0
        self.stream.units = self.plan.stream_from(key)
        # A persistent DataLoader's new iterator is the old one reset: it waits for the units in
        # flight (the consumer's wait, bounded by the watchdog) and keeps its workers.
        self._it = iter(self.loader)
        self.restarts += 1
        self._next = key

    def _take(self, key: tuple[int, int]) -> Batch:
        if self._it is None or self._next != key:
            self._start(key)
        self._next = None  # mid-batch: a failure here leaves the stream to be restarted
        parts = []
        while True:
            (epoch, step, part, n_parts), images = next(self._it)
            self._received += 1
            if (epoch, step, part) != (*key, len(parts)):
                raise RuntimeError(f"torch loader: got unit {(epoch, step, part)} for batch {key}")
            parts.append(images)
            if len(parts) == n_parts:
                break
        self._next = self.plan.after(key)
        return self._assemble(parts, self.plan.positions(*key))

    def _assemble(self, parts: list[torch.Tensor], positions: np.ndarray) -> Batch:
        """The units' uint8 images written into one float32 batch on the device (in the model's
        memory format), normalized there once: no host-side concatenation."""
        device = self.device
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        n = sum(len(p) for p in parts)
        out = torch.empty((n, *parts[0].shape[1:]), dtype=torch.float32, device=device, memory_format=fmt)
        row = 0
        for p in parts:
            out[row : row + len(p)].copy_(p.to(device, non_blocking=True))
            row += len(p)
        mean, std = mean_std(device)
        index = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        labels = torch.from_numpy(np.asarray(self.index.labels[positions], dtype=np.float32))
        if device.type == "cuda":
            index, labels = index.pin_memory(), labels.pin_memory()  # copied without a host sync
        return Batch(
            images=out.div_(255.0).sub_(mean).div_(std),
            labels=labels.to(device, non_blocking=True),
            index=index.to(device, non_blocking=True),
        )

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.steps_per_epoch):
            yield self._take((epoch, step))

    def close(self) -> None:
        """Stop the workers now (they also stop when the loader is garbage collected)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        self._it, self._next = None, None
