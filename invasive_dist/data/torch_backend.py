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
for every loader (each worker imports torch). Workers reset SIGTERM/SIGUSR1/SIGINT to the default,
so a signal ends them; only the trainer's main process turns SIGTERM into a checkpoint.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import faults
from .base import (
    Batch,
    LoaderBase,
    Shard,
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

__all__ = ["TorchLoader", "decode_rgb", "eval_transform", "random_resized_crop_params", "train_transform"]

START_METHOD = "forkserver"


class _ImageDataset(Dataset):
    """Item = (position, augmentation seed or -1 for the eval transform)."""

    def __init__(self, index: DataIndex, cfg_data) -> None:
        self.paths = index.paths
        self.labels = index.labels
        self.d = cfg_data

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        pos, seed = item
        faults.data_item()
        img = decode_rgb(self.paths[pos])
        d = self.d
        if seed < 0:
            img = eval_transform(img, d.image_size, d.eval_crop_pct, d.eval_geometry)
        else:
            img = train_transform(img, d.image_size, d.scale_min, d.hflip, d.vflip, d.rot90, seed)
        return img, int(self.labels[pos]), pos


def _collate(items):
    imgs, labels, pos = zip(*items)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.float32), torch.tensor(pos)


def _worker_init(worker_id: int) -> None:
    """Default SIGTERM/SIGUSR1/SIGINT in a worker: only the trainer's main process turns a signal
    into a checkpoint; a worker that inherited that handler would only set a flag and live on."""
    del worker_id
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    faults.in_data_worker()


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of the decoding workers (see the module docstring): forkserver, whose
    server is a fresh single-threaded process that imports this module once."""
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Replaces the default preload (``__main__``): the workers need this module, not the CLI.
        ctx.set_forkserver_preload([__name__])
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

    def __init__(
        self,
        index: DataIndex,
        cfg_data,
        shard: Shard,
        device: torch.device,
        train: bool,
        seed: int,
        channels_last: bool = False,
    ) -> None:
        super().__init__(index, cfg_data, shard, device, train, seed, channels_last)
        self.dataset = _ImageDataset(index, cfg_data)
        if train:
            self.steps_per_epoch = train_steps(len(index), self.batch, shard)
        else:
            self.steps_per_epoch = len(eval_plan(len(index), self.batch, shard))
        self.sampler = _EpochPlan()
        workers = self.d.num_workers
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            worker_init_fn=_worker_init if workers else None,
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
