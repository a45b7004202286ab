"""The DALI backend: ``fn.readers.file`` + JPEG decoding on the GPU (``mixed``) or, without CUDA, the
same pipeline on CPU operators (``device_id=None``).

    loader = DaliLoader(index, cfg.data, Shard(rank, world), device, train=True, seed=0)
    for batch in loader.iter_epoch(epoch, start_step=0): ...

Train: ``decoders.image_random_crop`` (area [scale_min, 1], aspect [3/4, 4/3]) -> ``resize`` to
image_size -> ``flip`` (coin flips) -> ``rotate`` by 0/90/180/270 (option) -> ``crop_mirror_normalize``.
Eval: ``decoders.image`` -> ``resize`` of the shorter side to ``eval_resize_size`` (antialias) -> center
crop and normalize in ``crop_mirror_normalize``. The resize size and crop offset are computed per image
from the JPEG header the way torchvision computes them (see ``_torchvision_eval_geometry``), so the eval
images agree with the torch backend's to one uint8 level (CPU, measured in tests/unit/test_backends.py).
Decoding is ``mixed`` (nvJPEG, ``hw_decoder_load`` of it on the hardware JPEG engines) and the rest runs
on the GPU; the reader stays on the CPU either way. Channels-last output comes from an HWC
``crop_mirror_normalize`` layout, viewed as NCHW without a copy.

Order and sharding. The reader is given the epoch's file list and shards it itself
(``shard_id``/``num_shards``, ``pad_last_batch``, ``stick_to_shard``); the label it carries is the sample's
position in the ``DataIndex``, so ``Batch.index`` comes out of the pipeline and the 0/1 label is looked
up on the device. DALI cuts N files into shards ``[floor(i N / S), floor((i+1) N / S))`` (sizes differ by
one when S does not divide N) and ``pad_last_batch`` repeats a shard's last sample to fill its last
batch. Rather than live with unequal shards, the file list is laid out so that every shard has the
same length and is exactly this backend's share of the torch backend's plan (``base.train_plan`` /
``base.eval_plan``):

- train: list = rank 0's plan, then rank 1's, ... (each ``steps x batch`` long, wrapped like the
  torch backend's), so shard r is rank r's plan in order: same batches of indices as the torch
  backend, every sample at least once per epoch, ``steps_per_epoch = ceil(N / (batch x world))`` on
  every rank, and the padding is spread over the epoch's first samples instead of ``batch - 1``
  copies of one image.
- eval: the split in order, padded to a multiple of world size by repeating its first samples, so
  shard r is rank r's contiguous ``eval_plan`` shard; the last batch's ``pad_last_batch`` rows are cut
  off, so each rank yields its shard once (the padding to a multiple of world size repeats real
  samples, removed by index in ``train.gather_unique``).

The order is a seeded permutation per epoch (``base.epoch_seed``), not the reader's
``random_shuffle``: that one shuffles the file list once with a fixed seed, so each rank would see
the same subset every epoch, and it only shuffles within a buffer. The pipeline is rebuilt for every
epoch (new file list, augmentation seed from (seed, epoch, rank)); that costs a pipeline build per
epoch (tens of ms on CPU; on a GPU the decoder set-up too, unmeasured here). An epoch is a pure
function of (seed, epoch, rank), so ``start_step=k`` runs the pipeline k times and discards the output
(the remaining batches are then the same as in an uninterrupted epoch, augmentations included; the
price is decoding k batches once, on resume).

Errors: a missing file is refused when the loader is built; a file DALI cannot decode stops the
pipeline with a message that names no file, so the files of the failing batches are checked with
torchvision and the UserError names the first bad one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from ..errors import UserError
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    LoaderBase,
    Shard,
    eval_resize_size,
    train_plan,
    train_steps,
)
from .kaggle import DataIndex

READER = "Reader"
PREFETCH = 2  # DALI's prefetch_queue_depth: batches decoded ahead of the consumer


def _torchvision_eval_geometry(jpegs, short: int, size: int):
    """Per-sample (resize_x, resize_y, crop_pos_x, crop_pos_y) that reproduce torchvision's
    ``resize(short)`` + ``center_crop(size)``: the longer side is truncated (``int(short * long /
    short_side)``) and the crop offset is Python's ``round((n - size) / 2)``, halves to the even
    neighbour. DALI's own ``resize_shorter`` keeps a fractional scale and its 0.5 crop rounds halves up;
    either is a pixel off, which on real photos costs about 15 levels of mean difference."""
    # (H, W, C) after EXIF orientation, from the encoded file: CPU-only, whatever decodes it.
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32)
    h, w = shape[0], shape[1]
    landscape, portrait = h <= w, h > w
    new_h = short * landscape + ((short * h) // w) * portrait
    new_w = short * portrait + ((short * w) // h) * landscape

    def crop_pos(n):
        d = n - size
        k = d // 2
        offset = k + (d - 2 * k) * (k - 2 * (k // 2))  # d odd and k odd: round half to even is k + 1
        return offset / dmath.max(d, 1)  # DALI's anchor is round(crop_pos * d): back to offset

    return (
        fn.cast(new_w, dtype=types.FLOAT),
        fn.cast(new_h, dtype=types.FLOAT),
        crop_pos(new_w),
        crop_pos(new_h),
    )


@pipeline_def
def _pipeline(files, positions, shard: Shard, train: bool, gpu: bool, d, channels_last: bool):
    jpegs, pos = fn.readers.file(
        files=files,
        labels=positions,
        shard_id=shard.rank,
        num_shards=shard.world,
        random_shuffle=False,  # the file list is already the epoch's permutation (module docstring)
        pad_last_batch=True,
        stick_to_shard=True,
        name=READER,
    )
    decoder = {"device": "mixed", "hw_decoder_load": d.dali_hw_decoder_load} if gpu else {"device": "cpu"}
    size = d.image_size
    if train:
        images = fn.decoders.image_random_crop(
            jpegs,
            output_type=types.RGB,
            random_area=[d.scale_min, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
            **decoder,
        )
        images = fn.resize(images, size=[size, size], antialias=True)
        if d.hflip or d.vflip:
            images = fn.flip(
                images,
                horizontal=fn.random.coin_flip() if d.hflip else 0,
                vertical=fn.random.coin_flip() if d.vflip else 0,
            )
        if d.rot90:
            # Multiples of 90 degrees of a square image with nearest-neighbour sampling are exact
            # pixel permutations (checked against np.rot90).
            angle = fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0])
            images = fn.rotate(images, angle=angle, interp_type=types.INTERP_NN, keep_size=True)
        crop_pos_x = crop_pos_y = 0.5  # the image is already image_size square
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        resize_x, resize_y, crop_pos_x, crop_pos_y = _torchvision_eval_geometry(
            jpegs, eval_resize_size(size, d.eval_crop_pct), size
        )
        images = fn.resize(images, resize_x=resize_x, resize_y=resize_y, antialias=True, subpixel_scale=False)
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        # HWC output is an NHWC batch: permuted to NCHW it is channels_last without a copy.
        output_layout="HWC" if channels_last else "CHW",
        crop=(size, size),
        crop_pos_x=crop_pos_x,
        crop_pos_y=crop_pos_y,
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[s * 255 for s in IMAGENET_STD],
    )
    if gpu:
        pos = pos.gpu()
    return images, pos


def _dali_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation seed of one rank's epoch pipeline (DALI takes a non-negative 32-bit int)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xDA11]).generate_state(1)[0] & 0x7FFFFFFF)


class DaliLoader(LoaderBase):
    """One split, one rank: ``iter_epoch`` builds that epoch's pipeline and yields device batches."""

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
        self.gpu = self.device.type == "cuda"
        n = self.n
        missing = [p for p in index.paths if not os.path.isfile(p)]
        if missing:
            raise UserError(
                f"{missing[0]}: image file is missing ({len(missing)} of {n} files of the split are); "
                "run `invasive-dist check-data`"
            )
        self.paths = [str(p) for p in index.paths]
        self.labels = torch.tensor(np.asarray(index.labels, dtype=np.float32), device=self.device)
        if train:
            self.per_rank = train_steps(n, self.batch, shard) * self.batch
        else:
            self.per_rank = -(-n // shard.world)  # eval_plan's contiguous shard length
        self.steps_per_epoch = -(-self.per_rank // self.batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The reader's file list as positions: world equal shards, shard r = rank r's samples."""
        n, world = len(self.index), self.shard.world
        if self.train:
            plans = [
                train_plan(n, self.batch, Shard(r, world, self.shard.accum), self.seed, epoch)
                for r in range(world)
            ]
            return np.concatenate([p.ravel() for p in plans])
        return np.resize(np.arange(n), self.per_rank * world)

    def _build(self, order: np.ndarray, epoch: int):
        pipe = _pipeline(
            [self.paths[i] for i in order],
            [int(i) for i in order],
            self.shard,
            self.train,
            self.gpu,
            self.d,
            self.channels_last,
            batch_size=self.batch,
            num_threads=self.d.dali_threads,
            device_id=self._device_id(),
            seed=_dali_seed(self.seed, epoch if self.train else 0, self.shard.rank),
            prefetch_queue_depth=PREFETCH,
        )
        pipe.build()
        meta = pipe.reader_meta(READER)
        # The layout above relies on DALI cutting the list into world equal, batch-aligned shards.
        assert meta["epoch_size"] == len(order) and len(order) == self.per_rank * self.shard.world, meta
        return pipe

    def _device_id(self) -> int | None:
        if not self.gpu:
            return None  # CPU-only pipeline
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if start_step >= self.steps_per_epoch:
            return
        order = self.epoch_order(epoch)
        mine = order[self.shard.rank * self.per_rank : (self.shard.rank + 1) * self.per_rank]
        pipe = self._build(order, epoch)
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        try:
            for step in range(self.steps_per_epoch):
                try:
                    images, pos = pipe.run(stream)
                except RuntimeError as e:
                    raise self._data_error(e, mine, step, epoch) from None
                if step < start_step:
                    continue  # resume: the same random draws as an uninterrupted epoch
                yield self._to_batch(
                    images, pos, stream, real=min(self.batch, self.per_rank - step * self.batch)
                )
        finally:
            del pipe

    def _to_batch(self, images, pos, stream, real: int) -> Batch:
        images, pos = images.as_tensor(), pos.as_tensor()
        out = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
        index = torch.empty(pos.shape(), dtype=torch.int32, device=self.device)
        # On the GPU the copies are queued on torch's current stream after DALI's work: no host sync.
        feed_ndarray(images, out, cuda_stream=stream)
        feed_ndarray(pos, index, cuda_stream=stream)
        if self.channels_last:
            out = out.permute(0, 3, 1, 2)  # NHWC storage = NCHW in channels_last memory format
        index = index.view(-1).long()
        # Eval only: the rows pad_last_batch added after the shard's last sample.
        out, index = out[:real], index[:real]
        return Batch(images=out, labels=self.labels[index], index=index)

    def _data_error(self, err: RuntimeError, mine: np.ndarray, step: int, epoch: int) -> Exception:
        """A UserError naming the file behind DALI's failure, or the original error (a bug)."""
        from .torch_backend import decode_rgb

        msg = str(err)
        # The failure may be in a batch decoded ahead of this one; check those first, then the rest.
        ahead = mine[step * self.batch : (step + PREFETCH + 1) * self.batch]
        candidates = list(dict.fromkeys([*ahead.tolist(), *mine.tolist()]))
        for i in candidates:
            if self.paths[i] in msg:
                line = next(ln for ln in msg.splitlines() if self.paths[i] in ln)
                return UserError(f"{self.paths[i]}: DALI cannot read this image ({line.strip()})")
        for i in candidates:
            try:
                decode_rgb(self.index.paths[i])
            except UserError as bad:
                return UserError(f"DALI pipeline failed in epoch {epoch}, step {step}: {bad}")
        return err
