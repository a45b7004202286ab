"""What every input backend yields, and the sharding plan the host-side backends share.

A backend is any object with ``steps_per_epoch`` and ``iter_epoch(epoch, start_step=0)`` that
yields :class:`Batch` objects: images already on the device (float32, normalized, in the model's
memory format), labels and the positions of the samples in the split's ``DataIndex``.

Training order: one permutation per epoch, seeded by (seed, epoch) and identical on all ranks,
wrapped to a whole number of optimizer steps (world x batch x accum samples each); rank r takes
every world-th sample of each micro-step's slice. Optimizer step k therefore trains on positions
[k x G, (k + 1) x G) of the wrapped permutation (G the global batch) however G is split into
processes x batch x accum, each epoch visits every sample at least once, every rank has the same
number of steps, and the order is a pure function of (seed, epoch): resuming at step k only needs k,
also on another number of processes.

Evaluation order: the split in order, padded (by repeating the first samples) to a multiple of
world size and cut into contiguous per-rank shards. Padded duplicates carry real sample indices and
are removed by index when predictions are gathered (see ``evaluation.gather_unique``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float32, normalized, on the device
    labels: torch.Tensor  # (B,) float32 (0/1; -1 for unlabelled test images)
    index: torch.Tensor  # (B,) int64 positions in the split's DataIndex


class Loader(Protocol):
    steps_per_epoch: int

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    accum: int = 1  # micro-batches per optimizer step: a training epoch is whole optimizer steps


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch), the same on every rank."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def train_plan(n: int, batch: int, shard: Shard, seed: int, epoch: int) -> np.ndarray:
    """(micro-steps, batch) sample positions for this rank in this epoch."""
    global_batch = batch * shard.world
    steps = train_steps(n, batch, shard)
    perm = np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)
    order = np.resize(perm, steps * global_batch)  # wraps: pads with the epoch's first samples
    return order[shard.rank :: shard.world].reshape(steps, batch)


def train_steps(n: int, batch: int, shard: Shard) -> int:
    """Micro-steps of a training epoch: ceil(n / global batch) optimizer steps x accum."""
    return -(-n // (batch * shard.world * shard.accum)) * shard.accum


def eval_plan(n: int, batch: int, shard: Shard) -> list[np.ndarray]:
    """Per-step sample positions of this rank's contiguous shard (last batch may be short)."""
    per_rank = -(-n // shard.world)
    order = np.resize(np.arange(n), per_rank * shard.world)
    mine = order[shard.rank * per_rank : (shard.rank + 1) * per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


def sample_seeds(seed: int, epoch: int, rank: int, positions: np.ndarray) -> np.ndarray:
    """Per-sample augmentation seeds: differ across ranks, epochs and samples; independent of
    worker count and of where a run resumed."""
    ss = np.random.SeedSequence([seed, epoch, rank, 0xA5])
    base = ss.generate_state(1, np.uint64)[0]
    return (base ^ (positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))) >> np.uint64(1)


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalization constants, made once per device: building them from Python values on every
    batch would be a blocking host-to-device copy, a device sync per step."""
    device = torch.device(device)
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (
            torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
        )
    return _MEAN_STD[device]


def normalize_on_device(images_u8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B,3,H,W) on host or device -> float32 normalized on ``device``."""
    x = images_u8.to(device, non_blocking=True).float().div_(255.0)
    mean, std = _mean_std(device)
    x = x.sub_(mean).div_(std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def loader_batch_size(cfg_data, train: bool) -> int:
    """Per-device batch of a loader: ``batch_size`` for training, ``eval_batch_size`` (default
    twice that: no gradients to keep) for validation and prediction."""
    return cfg_data.batch_size if train else (cfg_data.eval_batch_size or 2 * cfg_data.batch_size)


class LoaderBase:
    """What every backend keeps from its constructor arguments (the ``build_loader`` signature)."""

    def __init__(
        self,
        index,
        cfg_data,
        shard: Shard,
        device: torch.device,
        train: bool,
        seed: int,
        channels_last: bool = False,
    ) -> None:
        if len(index) == 0:
            raise UserError(
                f"{type(self).__name__}: the {'training' if train else 'evaluation'} split is empty"
            )
        self.index, self.d, self.shard, self.device = index, cfg_data, shard, torch.device(device)
        self.train, self.seed, self.channels_last = train, seed, channels_last
        self.n = len(index)
        self.batch = loader_batch_size(cfg_data, train)
