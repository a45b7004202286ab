"""The gpu_cache backend: decode the split once, keep it on the device as uint8, augment batches there.

    loader = GpuCacheLoader(index, cfg.data, Shard(rank, world), device, train=True, seed=0)
    for batch in loader.iter_epoch(epoch, start_step=0): ...

The Kaggle train set is 2,295 images: decoded once and stored at a short side of 379 px
(379x505x3 uint8, 0.57 MB each) it is 1.3 GB, small next to an H100's 80 GB, and after the first
epoch no JPEG is decoded again. On one H100 80GB a prototype of this (2,295 images at 433x577,
batched crop + flip + normalize) produced 84,933 img/s, far above what ResNet-50 consumes
(``shared/device/README.md``); DALI streaming peaks at 5,238 img/s.

Building the cache: on CUDA, ``torchvision.io.decode_jpeg(device="cuda")`` in batches of 64 files
(read by a thread pool), resized on the GPU; on CPU, torchvision decoding in a thread pool and the
cache lives in host memory. Files with an EXIF rotation, or that nvJPEG refuses, are decoded on the
CPU (EXIF applied, as the torch backend does); a file nothing can decode is a UserError naming it.

What is stored:

- train: every image of the split resized to one (H, W) whose shorter side is
  ``data.cache_short_side``, or when 0 ``max(ceil(image_size / sqrt(scale_min)), eval resize size)``
  = 379 for 224 / 0.35: the smallest random-resized crop (area ``scale_min`` of the image, aspect 1)
  is then still at least image_size pixels wide, so crops are (nearly) never upsampled. (H, W)
  follow the most common image size's aspect; an image of another aspect is center-cropped to that
  aspect first (no distortion). All Kaggle images are 1154x866, so none is cropped there.
- eval: the final image_size crops of this rank's shard only, made by the torch backend's own
  ``eval_transform`` (resize shorter side to ``eval_resize_size``, antialias, center crop), so an
  evaluation is a gather + normalize, and on CPU it equals the torch backend bit for bit.

Per training step, all on the device and with no host sync: the positions of ``base.train_plan``
(same order as the torch backend), random-resized-crop boxes drawn as the torch backend draws them
(area in [scale_min, 1], log-uniform aspect in [3/4, 4/3], the first of 10 tries that fits, else a
center square) from a ``torch.Generator`` on the device seeded per (seed, epoch, rank, step), one
``roi_align`` (torchvision's kernel) for crop + resize of the whole batch (``sampling_ratio=-1`` averages
ceil(crop / image_size) samples per output pixel in each direction, an antialiasing box filter),
flips and 90-degree rotations as ``torch.where`` over the batch, then normalization. A batch is a
pure function of (seed, epoch, rank, step), so ``start_step`` resumes exactly.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision.roi_align)
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import UserError
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    LoaderBase,
    Shard,
    eval_plan,
    eval_resize_size,
    train_plan,
    train_steps,
)
from .kaggle import DataIndex
from .torch_backend import decode_rgb, eval_transform

CUDA_DECODE_CHUNK = 64  # files per batched nvJPEG call
EXIF_ORIENTATION = 0x0112
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
TRIES = 10  # random-resized-crop attempts before the center-square fallback, as torchvision


def train_short_side(cfg_data) -> int:
    """Shorter side of the stored training images (see the module docstring)."""
    if cfg_data.cache_short_side:
        return cfg_data.cache_short_side
    no_upsampling = math.ceil(cfg_data.image_size / math.sqrt(cfg_data.scale_min))
    return max(no_upsampling, eval_resize_size(cfg_data.image_size, cfg_data.eval_crop_pct))


def _oriented_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the file header alone."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except FileNotFoundError:
        raise UserError(f"{path}: image file is missing (run `invasive-dist check-data`)") from None
    except Exception as e:
        raise UserError(
            f"{path}: cannot read the image header ({e}); run `invasive-dist check-data` "
            "or set data.on_bad_file=skip"
        ) from None
    return h, w


def _needs_cpu_decode(path: Path, data: bytes) -> bool:
    """nvJPEG decodes baseline/progressive JPEG only and ignores EXIF orientation."""
    if not data.startswith(b"\xff\xd8"):
        return True
    try:
        with Image.open(path) as im:
            return im.getexif().get(EXIF_ORIENTATION, 1) != 1
    except Exception:
        return True  # the CPU decoder names the file if it is broken


class GpuCacheLoader(LoaderBase):
    """One split, one rank: the split decoded once onto ``device``; batches augmented there."""

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
        n = self.n
        if train:
            self.steps_per_epoch = train_steps(n, self.batch, shard)
            positions = np.arange(n)  # every epoch's permutation spans the whole split
        else:
            self.plan = eval_plan(n, self.batch, shard)
            self.steps_per_epoch = len(self.plan)
            positions = np.unique(np.concatenate(self.plan))  # this rank's shard only
        row_of = torch.full((n,), -1, dtype=torch.int64)
        row_of[torch.from_numpy(positions)] = torch.arange(len(positions))
        self.row_of = row_of.to(self.device)
        self.labels = torch.tensor(np.asarray(index.labels, dtype=np.float32), device=self.device)
        self.images = self._build_cache(positions)  # (rows, 3, H, W) uint8 on the device
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------------------------------
    # The cache.

    def _stored_shape(self, positions: np.ndarray, pool: ThreadPoolExecutor) -> tuple[int, int]:
        size = self.d.image_size
        if not self.train:
            return size, size
        shapes = list(pool.map(_oriented_size, [self.index.paths[i] for i in positions]))
        self.dominant = Counter(shapes).most_common(1)[0][0]
        h, w = self.dominant
        short = train_short_side(self.d)
        # torchvision's rule for resize(short): the longer side is truncated.
        return (short, int(short * w / h)) if h <= w else (int(short * h / w), short)

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        """A decoded (3, h, w) or (b, 3, h, w) uint8 image in the stored form."""
        if not self.train:
            return eval_transform(img, self.d.image_size, self.d.eval_crop_pct)
        H, W = self.stored
        h, w = img.shape[-2:]
        if (h, w) != self.dominant and h * W != w * H:  # another aspect: center-crop to ours first
            ch, cw = (h, round(h * W / H)) if w * H > h * W else (round(w * H / W), w)
            img = TF.center_crop(img, [ch, cw])
        return TF.resize(img, [H, W], antialias=True)

    def _build_cache(self, positions: np.ndarray) -> torch.Tensor:
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            self.stored = self._stored_shape(positions, pool)
            H, W = self.stored
            nbytes = len(positions) * 3 * H * W
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if nbytes > 0.5 * free:
                    raise UserError(
                        f"data.backend=gpu_cache: {len(positions)} images at {H}x{W} need {nbytes / 2**30:.1f} GiB, "
                        f"more than half of the {free / 2**30:.1f} GiB free on {self.device}; lower "
                        "data.cache_short_side or use data.backend=dali"
                    )
            cache = torch.empty((len(positions), 3, H, W), dtype=torch.uint8, device=self.device)
            paths = [self.index.paths[i] for i in positions]
            if self.device.type == "cuda":
                self._fill_cuda(cache, paths, pool)
            else:

                def one(row: int) -> None:
                    cache[row] = self._fit(decode_rgb(paths[row]))

                list(pool.map(one, range(len(paths))))
        return cache

    def _fill_cuda(self, cache: torch.Tensor, paths: list[Path], pool: ThreadPoolExecutor) -> None:
        def read(path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except FileNotFoundError:
                raise UserError(f"{path}: image file is missing (run `invasive-dist check-data`)") from None

        for start in range(0, len(paths), CUDA_DECODE_CHUNK):
            chunk = paths[start : start + CUDA_DECODE_CHUNK]
            blobs = list(pool.map(read, chunk))
            images: list[torch.Tensor | None] = [None] * len(chunk)
            gpu = [i for i, (p, b) in enumerate(zip(chunk, blobs)) if b and not _needs_cpu_decode(p, b)]
            if gpu:
                data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu]
                try:
                    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                    for i, img in zip(gpu, decoded):
                        images[i] = img
                except RuntimeError:
                    pass  # one bad file fails the whole call: the CPU pass below names it
            for i, img in enumerate(images):
                if img is None:
                    images[i] = decode_rgb(chunk[i]).to(self.device)
            # One resize per distinct decoded size (all of them, for the Kaggle images).
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, img in enumerate(images):
                by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
            for rows in by_size.values():
                fitted = self._fit(torch.stack([images[i] for i in rows]))
                cache[torch.tensor([start + i for i in rows], device=self.device)] = fitted

    # ------------------------------------------------------------------------------------------
    # Batches.

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
        if self.device.type == "cuda":
            t = t.pin_memory()  # so the copy is asynchronous
        return t.to(self.device, non_blocking=True)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if start_step >= self.steps_per_epoch:
            return
        if not self.train:
            lengths = [len(p) for p in self.plan]
            # One host-to-device copy for the whole evaluation, split into per-step views.
            steps = self._to_device(np.concatenate(self.plan)).split(lengths)
            for idx in steps[start_step:]:
                images = self.images.index_select(0, self.row_of[idx]).float()
                yield Batch(self._normalize(images), self.labels[idx], idx)
            return
        n, rank = len(self.index), self.shard.rank
        plan = self._to_device(train_plan(n, self.batch, self.shard, self.seed, epoch))
        step_seeds = np.random.SeedSequence([self.seed, epoch, rank, 0x6C]).generate_state(
            len(plan), np.uint64
        )
        gen = torch.Generator(device=self.device)
        for step in range(start_step, self.steps_per_epoch):
            gen.manual_seed(int(step_seeds[step] >> np.uint64(1)))
            idx = plan[step]
            yield Batch(self._augment(self.row_of[idx], gen), self.labels[idx], idx)

    def _augment(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d, dev = self.d, self.device
        b, size = rows.numel(), d.image_size
        H, W = self.stored
        # Random resized crop, as torch_backend.random_resized_crop_params draws it, for the batch.
        u = torch.rand((b, TRIES, 2), generator=gen, device=dev, dtype=torch.float64)
        area = H * W * (d.scale_min + (1 - d.scale_min) * u[..., 0])
        ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * u[..., 1])
        cw, ch = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        fits = (cw >= 1) & (cw <= W) & (ch >= 1) & (ch <= H)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
        side = float(min(H, W))
        any_fit = fits.any(1)
        cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), side)
        ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), side)
        r = torch.rand((b, 5), generator=gen, device=dev, dtype=torch.float64)
        top = torch.where(any_fit, torch.floor(r[:, 0] * (H - ch + 1)).clamp_max(H - ch), (H - ch) // 2)
        left = torch.where(any_fit, torch.floor(r[:, 1] * (W - cw + 1)).clamp_max(W - cw), (W - cw) // 2)
        boxes = torch.stack(
            [torch.arange(b, device=dev, dtype=torch.float64), left, top, left + cw, top + ch], 1
        )
        x = self.images.index_select(0, rows).float()
        # torchvision's kernel (input, rois, spatial_scale, out_h, out_w, sampling_ratio, aligned), not the
        # torchvision.ops.roi_align wrapper: under torch.use_deterministic_algorithms (train.deterministic)
        # on CUDA the wrapper swaps in a pure-PyTorch version that, with adaptive sampling, materializes
        # every input pixel for every output pixel. The forward kernel is deterministic as it is.
        out = torch.ops.torchvision.roi_align(x, boxes.float(), 1.0, size, size, -1, True)
        # Flips and rotations: the draws are made whatever the config, so the crops do not depend on it.
        if d.hflip:
            out = torch.where((r[:, 2] < 0.5).view(b, 1, 1, 1), out.flip(3), out)
        if d.vflip:
            out = torch.where((r[:, 3] < 0.5).view(b, 1, 1, 1), out.flip(2), out)
        if d.rot90:
            k = torch.floor(r[:, 4] * 4).view(b, 1, 1, 1)
            base = out
            for quarter in (1, 2, 3):
                out = torch.where(k == quarter, base.rot90(quarter, dims=(2, 3)), out)
        return self._normalize(out)  # the float crops, not rounded back to uint8 first

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``base.normalize_on_device``'s arithmetic with mean and std made once: that function builds
        them per batch (``torch.tensor(..., device=cuda)``), a blocking host-to-device copy."""
        x = x.div_(255.0).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
