"""The loader contract: what every input backend is built from, what it yields, and the sharding
plan the backends share.

A backend is a class built from a frozen :class:`LoaderSpec` (the split, the :class:`ImageSpec`
geometry, the :class:`Shard`, batch, seed, device, memory format) and its own config section,
``Backend(spec, section)``, with ``steps_per_epoch`` and ``iter_epoch(epoch, start_step=0)`` that
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
from ..faults import NO_FAULTS, Faults
from .kaggle import DataIndex

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


def mean_std(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std as (1, 3, 1, 1) float32 tensors on ``device``, made once per device
    and shared by every backend: building them from Python values on every batch would be a
    blocking host-to-device copy, a device sync per step."""
    device = torch.device(device)
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (
            torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
        )
    return _MEAN_STD[device]


def normalize_on_device(images_u8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B,3,H,W) on host or device -> float32 normalized on ``device``, written once in the
    model's memory format (channels_last: NHWC storage) instead of converted after."""
    x = images_u8.to(device, non_blocking=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    mean, std = mean_std(x.device)
    return out.copy_(x).div_(255.0).sub_(mean).div_(std)


@dataclass(frozen=True)
class ImageSpec:
    """What a loader makes of an image, the same in every backend (``transforms`` has the rules);
    read from the ``data.*`` keys of the same names by :meth:`from_config`."""

    size: tuple[int, int]  # (height, width) of the model input (``data.image_size``)
    eval_geometry: str = "full"  # "full" frame or "center_crop" for validation and prediction
    eval_crop_pct: float = 0.875  # center_crop: the crop's share of the resized image
    scale_min: float = 0.35  # training crops: lower bound of the area fraction
    hflip: bool = True  # training: random horizontal flips
    vflip: bool = True  # training: random vertical flips
    rot90: bool = False  # training: random quarter turns (half turns for a non-square size)

    @classmethod
    def from_config(cls, d) -> ImageSpec:
        """From a ``DataConfig`` (``data.image_size`` may be one side or [height, width])."""
        size = (d.image_size, d.image_size) if isinstance(d.image_size, int) else tuple(d.image_size)
        return cls(
            (int(size[0]), int(size[1])),
            d.eval_geometry,
            d.eval_crop_pct,
            d.scale_min,
            d.hflip,
            d.vflip,
            d.rot90,
        )


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend is built from besides its own config section (``data.torch``,
    ``data.dali``, ``data.gpu_cache``): the one loader contract, made by :meth:`of` and handed to
    ``data.build_loader``. Frozen: a loader never changes what it was asked for."""

    index: DataIndex  # the split, in order
    image: ImageSpec  # the image geometry and augmentations
    shard: Shard  # this rank's part of the split
    batch: int  # per-device batch of this loader
    train: bool  # training order and augmentation, or the evaluation order and view
    seed: int  # the run's seed: order and augmentation are pure functions of it
    device: torch.device  # where batches are delivered
    channels_last: bool = False  # NHWC images (the model's memory format on a GPU)
    epochs: int | None = None  # training epochs the consumer draws (None: no end known)
    faults: Faults = NO_FAULTS  # fault hooks for decoding workers (the fault-tolerance tests)

    @classmethod
    def of(
        cls,
        index: DataIndex,
        d,
        shard: Shard,
        device: torch.device | str,
        train: bool,
        seed: int,
        channels_last: bool = False,
        per_device: int | None = None,
        epochs: int | None = None,
        faults: Faults = NO_FAULTS,
    ) -> LoaderSpec:
        """The spec of a loader from a ``DataConfig`` ``d``. ``per_device``: the per-device training
        batch (``build.BatchPlan.per_device``; default ``data.batch_size``). Evaluation loaders use
        ``data.eval_batch_size``, or twice the training batch when 0: no gradients to keep."""
        batch = per_device or d.batch_size
        if not train:
            batch = d.eval_batch_size or 2 * batch
        return cls(
            index,
            ImageSpec.from_config(d),
            shard,
            batch,
            train,
            seed,
            torch.device(device),
            channels_last,
            epochs,
            faults,
        )


class LoaderBase:
    """What every backend keeps of its :class:`LoaderSpec`."""

    def __init__(self, spec: LoaderSpec) -> None:
        if len(spec.index) == 0:
            raise UserError(
                f"{type(self).__name__}: the {'training' if spec.train else 'evaluation'} split is empty"
            )
        self.spec, self.index, self.image, self.shard = spec, spec.index, spec.image, spec.shard
        self.device, self.train, self.seed = spec.device, spec.train, spec.seed
        self.channels_last, self.batch = spec.channels_last, spec.batch
        self.n = len(spec.index)
