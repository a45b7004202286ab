"""The gpu_cache backend: decode the split once, keep it on the device as uint8, augment batches there.

    loader = GpuCacheLoader(LoaderSpec.of(index, cfg.data, Shard(rank, world), device, True, 0), cfg.data.gpu_cache)
    loader.build_info  # {"cache_build_s": ..., "cache_bytes": ... (this rank), "cache_images": ...}
    for batch in loader.iter_epoch(epoch, start_step=0): ...

The Kaggle train set is 2,295 images: decoded once and stored at a short side of 379 px
(379x505x3 uint8, 0.57 MB each) it is 1.3 GB, small next to an H100's 80 GB, and after the build
no JPEG is decoded again. No figure of this code on a GPU has been recorded yet: see
docs/performance.md for what has and has not been measured.

Building the cache. On CUDA: the files of a chunk of 64 are read by a thread pool while the previous
chunk is on the device, decoded in one batched call and resized on the GPU. The decoder
(``data.gpu_cache.decoder``, auto by default) is DALI's ``mixed`` one where nvidia.dali imports
(``dali.JpegDecoder``, all of the JPEGs on the GPU's hardware JPEG engines: a prototype decoded the
1154x866 photos at 5,238 img/s that way against 3,162 with torchvision's, on an H100), else
``torchvision.io.decode_jpeg(device="cuda")``. torchvision's allocates its outputs on the current
stream but has nvJPEG write them from a stream of its own that does not wait for the current one
(pytorch/vision#9606): it can be handed memory that the previous chunk's queued resize or cache
writes still read, and overwrite it. So the device is synchronized before each call, with either
decoder (one sync per 64 images, at build time only). On CPU the same chunks are decoded in the
thread pool by torchvision (``decoder=dali`` there: DALI's CPU decoder, the same code as on CUDA with
the device switched) and the cache lives in host memory; ``build_info["cache_decoder"]`` says which. Files
with an EXIF rotation, or that nvJPEG refuses, are decoded on the CPU (EXIF applied, as the torch backend does); a file nothing can decode is a
UserError naming it. The main process (rank 0) shows the build's progress (``progress.Progress``:
images/s and ETA, a bar on a terminal, periodic lines in a log) and every rank's time and bytes are
kept in ``build_info``.

What is stored:

- train: every image of the split resized to one (H, W) whose shorter side is
  ``data.gpu_cache.short_side``, or when 0 ``max(ceil(image_size / sqrt(scale_min)), round(image_size / eval_crop_pct))``
  = 379 for 224 / 0.35: the smallest random-resized crop (area ``scale_min`` of the image, aspect 1)
  is then still at least image_size pixels wide, so crops are (nearly) never upsampled. When 0, it is
  never more than the photos' own shorter side (storing upsampled pixels adds memory, not detail:
  [600, 800] inputs would want 1,015 px of the 866 the 1154x866 photos have, 7.6 GB instead of
  5.5 GB per rank for a fold's 1,836 training images; the small crops are then upsampled at crop time, as the torch
  backend upsamples them). (H, W) follow the most common image size's aspect; an image of another aspect is center-cropped to that
  aspect first (no distortion). All Kaggle images are 1154x866, so none is cropped there.
- eval: the final image_size views of this rank's shard only (``data.eval_geometry``), made by the
  torch backend's own ``transforms.eval_transform``, so an evaluation is a gather + normalize; on CPU
  it equals the torch backend bit for bit.
- [h, w] sizes: the stored shorter side uses the input's shorter side in the rule above, and the
  crops' aspect range is centred on w / h (``transforms``); a 4:3 input crops 4:3 photos alike.

A training batch is made in four device operations and no host sync (``fused_crop``): gather the
batch's uint8 images and widen them to the compute dtype (fp16 on CUDA, fp32 on CPU), then two
batched matrix products with per-sample resampling matrices, ``out = Wy @ img @ Wx^T``. Row i of Wx
holds the weights of output column i over the input columns: the triangle filter of torchvision's
antialiased bilinear resize, widened by the scale factor when shrinking and limited to the crop box,
i.e. what ``TF.resized_crop(..., antialias=True)`` computes. The at most 7 non-zero taps per row
(505 -> 224) are computed and scattered into zeroed matrices; a flip reverses the rows of a matrix;
the per-channel 1/(255 std) is folded into Wy; the last operation adds -mean/std while writing
float32 in the model's memory format (with ``rot90``, a per-sample transpose before it). For 256
crops of 224 px from 379x505 images that is about 95 GFLOP of fp16 matrix products and 2 GB of
memory traffic (by arithmetic: 0.6 ms of an H100's 3.35 TB/s; not measured yet).

The crop boxes and flips of an epoch are drawn on the host when the epoch starts, as the torch
backend draws them (area in [scale_min, 1], log-uniform aspect in [3/4, 4/3] x the input's w / h, the
first of 10 tries that fits, else the centred box of that aspect; hflip, vflip with probability 1/2;
rot90 k uniform in 0..3, or in {0, 2} for a non-square input), from
per-sample seeds ``base.sample_seeds(seed, epoch, rank, slot)``: a batch is a pure function of
(seed, epoch, rank, step) and ``start_step`` resumes exactly. They go to the device in one copy per
epoch. On CUDA the next batch is prepared on a side stream while the current step runs (an event
orders it before its use, ``record_stream`` keeps its memory alive); on CPU batches are made in turn.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..distributed import usable_cores
from ..errors import UserError
from ..progress import Progress
from .base import (
    Batch,
    ImageSpec,
    LoaderBase,
    LoaderSpec,
    eval_plan,
    mean_std,
    normalize_on_device,
    sample_seeds,
    train_plan,
    train_steps,
)
from .transforms import (
    decode_rgb,
    eval_cover_size,
    eval_transform,
    exif_orientation,
    fallback_box,
    image_hw,
    log_ratio_range,
    oriented_size,
    quarter_turns,
)

CUDA_DECODE_CHUNK = 64  # files per chunk of the build (one batched nvJPEG call on CUDA)
DECODERS = ("auto", "dali", "torchvision")
# The build does nothing but decode: every JPEG to the hardware engines (5,238 img/s with 1.0 against
# 1,802 with DALI's default on an H100, prototype figures); training's own DALI loader uses 0.9.
BUILD_HW_DECODER_LOAD = 1.0
TRIES = 10  # random-resized-crop attempts before the centred fallback box, as torchvision
DRAWS = 2 * TRIES + 5  # uniforms per sample: 10 x (area, aspect), top, left, hflip, vflip, rot90


@dataclass
class GpuCacheConfig:
    """``data.gpu_cache``: the gpu_cache backend's settings."""

    short_side: int = 0  # stored training image's shorter side (0 = no upsampling of the smallest crop)
    decoder: str = "auto"  # JPEG decoder of the build: dali, torchvision, auto (dali on CUDA if it imports)

    def problems(self, image_size: int | list[int]) -> list[str]:
        if self.decoder not in DECODERS:
            return [f"data.gpu_cache.decoder={self.decoder!r} must be one of {', '.join(DECODERS)}"]
        if self.short_side and self.short_side < min(image_hw(image_size)):
            return [
                f"data.gpu_cache.short_side={self.short_side} is smaller than data.image_size={image_size}: "
                "the stored image cannot hold the crop"
            ]
        return [f"data.gpu_cache.short_side={self.short_side} must be >= 0"] if self.short_side < 0 else []


def train_short_side(image: ImageSpec, cfg: GpuCacheConfig) -> int:
    """Shorter side of the stored training images (see the module docstring)."""
    if cfg.short_side:
        return cfg.short_side
    # The input's shorter side: for a [h, w] input of the photos' own aspect the smallest crop is
    # then at least (h, w) too.
    no_upsampling = math.ceil(min(image.size) / math.sqrt(image.scale_min))
    return max(no_upsampling, min(eval_cover_size(image.size, image.eval_crop_pct)))


# ----------------------------------------------------------------------------------------------
# Augmentation parameters, drawn on the host.


def uniforms(seeds: np.ndarray, k: int) -> np.ndarray:
    """(n, k) uniforms in [0, 1) from n 63-bit seeds: SplitMix64 of (seed, j), vectorized."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        z = seeds.astype(np.uint64)[:, None] + (
            np.arange(1, k + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass(frozen=True)
class CropPlan:
    """Per-sample crop box in the stored image (pixels) and the dihedral transform after it,
    written as flips of the crop's own axes followed by an optional transpose."""

    top: np.ndarray  # (n,) int64
    left: np.ndarray  # (n,) int64
    height: np.ndarray  # (n,) int64
    width: np.ndarray  # (n,) int64
    flip_h: np.ndarray  # (n,) bool: reverse the rows (a vertical flip)
    flip_w: np.ndarray  # (n,) bool: reverse the columns (a horizontal flip)
    transpose: np.ndarray  # (n,) bool: swap rows and columns last

    def packed(self) -> np.ndarray:
        """(n, 7) float32 for one host-to-device copy (all values are exact in float32)."""
        cols = (self.top, self.left, self.height, self.width, self.flip_h, self.flip_w, self.transpose)
        return np.stack([c.astype(np.float32) for c in cols], 1)


def crop_plan(
    seeds: np.ndarray,
    h: int,
    w: int,
    scale_min: float,
    hflip: bool,
    vflip: bool,
    rot90: bool,
    hw: tuple[int, int] = (1, 1),
) -> CropPlan:
    """``transforms.random_resized_crop_params`` and ``train_transform``'s flips and turns for n
    samples of an (h, w) image, one seed each, for an input of size ``hw`` (its aspect sets the
    crops' aspect range; a non-square one turns by 0 or 180 degrees only). The draws are made
    whatever the config, so the boxes do not depend on which flips are on."""
    u = uniforms(seeds, DRAWS)
    n = len(seeds)
    tries = u[:, : 2 * TRIES].reshape(n, TRIES, 2)
    area = h * w * (scale_min + (1 - scale_min) * tries[..., 0])
    lo, hi = log_ratio_range(hw)
    ratio = np.exp(lo + (hi - lo) * tries[..., 1])
    cw, ch = (
        np.round(np.sqrt(area * ratio)),
        np.round(np.sqrt(area / ratio)),
    )  # round half to even, as round()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = fits.argmax(1)  # the first try that fits
    any_fit = fits.any(1)
    fb_h, fb_w = fallback_box(h, w, hw)
    rows = np.arange(n)
    cw = np.where(any_fit, cw[rows, first], fb_w).astype(np.int64)
    ch = np.where(any_fit, ch[rows, first], fb_h).astype(np.int64)
    r = u[:, 2 * TRIES :]
    top = np.where(any_fit, np.minimum(np.floor(r[:, 0] * (h - ch + 1)), h - ch), (h - ch) // 2)
    left = np.where(any_fit, np.minimum(np.floor(r[:, 1] * (w - cw + 1)), w - cw), (w - cw) // 2)
    fh = (r[:, 2] < 0.5) & hflip  # horizontal flip: reverse the columns
    fv = (r[:, 3] < 0.5) & vflip
    k = quarter_turns(r[:, 4], hw) if rot90 else np.zeros(n, np.int64)
    # rot90(x, k) after the flips, as flips first and a transpose last: rot90 by 1 is
    # transpose(flip_w(x)), by 2 flip_h(flip_w(x)), by 3 transpose(flip_h(x)) (tested against torch.rot90).
    flip_w = fh ^ ((k == 1) | (k == 2))
    flip_h = fv ^ ((k == 2) | (k == 3))
    return CropPlan(top.astype(np.int64), left.astype(np.int64), ch, cw, flip_h, flip_w, (k == 1) | (k == 3))


# ----------------------------------------------------------------------------------------------
# The fused crop + resize + flip + normalize.


def resample_taps(
    start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor, in_size: int, out_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero part of an antialiased bilinear resize of [start, start + length) to out_size
    pixels (torchvision's and PIL's triangle filter, its support widened by the scale when
    shrinking), output order reversed where ``flip``: (n, out_size, K) input positions (``in_size``
    for taps outside the crop) and float32 weights summing to 1 per output pixel. ``start``,
    ``length`` and ``flip`` are (n,) float32 tensors on the device; K = ceil(2 in/out) + 2 bounds
    the taps of any crop (7 for 505 -> 224), so this costs n x out x K, not n x out x in."""
    dev, n = start.device, start.numel()
    k = math.ceil(2 * max(in_size / out_size, 1.0)) + 2
    i = torch.arange(out_size, device=dev, dtype=torch.float32)
    i = torch.where(flip.view(n, 1) > 0, out_size - 1 - i, i).view(n, out_size, 1)
    scale = (length / out_size).view(n, 1, 1)
    support = scale.clamp(min=1.0)
    center = start.view(n, 1, 1) + (i + 0.5) * scale  # in input pixels; pixel j spans [j, j + 1)
    # Taps: every j with |j + 0.5 - center| < support, i.e. from floor(center - support - 0.5) + 1.
    j = torch.floor(center - support - 0.5) + 1 + torch.arange(k, device=dev, dtype=torch.float32)
    wgt = (1 - (j + 0.5 - center).abs() / support).clamp(min=0)
    inside = (j >= start.view(n, 1, 1)) & (j < (start + length).view(n, 1, 1))
    wgt = wgt * inside
    return torch.where(inside, j, float(in_size)).long(), wgt / wgt.sum(2, keepdim=True)


def resample_matrix(taps: torch.Tensor, wgt: torch.Tensor, in_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., out, in) dense matrices from ``resample_taps`` (weights broadcast over leading dims):
    zeros with one spare column that the taps outside the crop write to, cut off afterwards."""
    shape = torch.broadcast_shapes(taps.shape, wgt.shape)
    dense = torch.zeros((*shape[:-1], in_size + 1), dtype=dtype, device=wgt.device)
    dense.scatter_(-1, taps.expand(shape), wgt.expand(shape).to(dtype))
    return dense[..., :in_size]


def fused_crop(
    cache: torch.Tensor,
    rows: torch.Tensor,
    params: torch.Tensor,
    size: int | tuple[int, int],
    scale: torch.Tensor,
    shift: torch.Tensor,
    channels_last: bool,
    transpose: bool,
) -> torch.Tensor:
    """(B, 3, sh, sw) float32 normalized crops of ``cache[rows]`` (uint8 (N, 3, H, W)) along
    ``params`` ((B, 7) float32, ``CropPlan.packed``); ``size`` (sh, sw) or one side. ``scale`` (3,)
    = 1/(255 std), ``shift`` (1, 3, 1, 1) = -mean/std. ``transpose``: whether any sample may be
    transposed (rot90; square sizes only)."""
    sh, sw = image_hw(size)
    b = rows.numel()
    _, c, h, w = cache.shape
    # fp16 holds 0..255 exactly and the matrix products accumulate in fp32 on tensor cores; on CPU
    # fp16 products are slow, so fp32 there.
    dtype = torch.float16 if cache.is_cuda else torch.float32
    top, left, ch, cw, flip_h, flip_w, tr = params.unbind(1)
    wx = resample_matrix(*resample_taps(left, cw, flip_w, w, sw), w, dtype)  # (B, Sw, W)
    taps, wgt = resample_taps(top, ch, flip_h, h, sh)
    wgt = wgt.unsqueeze(1) * scale.view(1, c, 1, 1)  # the per-channel 1 / (255 std) folded in
    wy = resample_matrix(taps.unsqueeze(1), wgt, h, dtype)  # (B, 3, Sh, H)
    x = cache.index_select(0, rows).to(dtype)  # (B, 3, H, W)
    x = torch.bmm(x.view(b, c * h, w), wx.transpose(1, 2)).view(b, c, h, sw)  # columns first
    x = torch.matmul(wy, x)  # (B, 3, Sh, Sw)
    if transpose and sh == sw:
        x = torch.where(tr.view(b, 1, 1, 1) > 0, x.transpose(2, 3), x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((b, c, sh, sw), dtype=torch.float32, device=cache.device, memory_format=fmt)
    return torch.add(x, shift, out=out)


# ----------------------------------------------------------------------------------------------
# The cache build.


def _needs_cpu_decode(path: Path, data: bytes) -> bool:
    """nvJPEG decodes baseline/progressive JPEG only and ignores EXIF orientation."""
    if not data.startswith(b"\xff\xd8"):
        return True
    try:
        with Image.open(path) as im:
            return exif_orientation(im) != 1
    except Exception:
        return True  # the CPU decoder names the file if it is broken


def _read(path: Path) -> tuple[bytes, bool]:
    """The file's bytes and whether it must be decoded on the CPU."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: image file is missing (run `invasive-dist check-data`)") from None
    return data, _needs_cpu_decode(path, data)


def _decode_or_none(data: torch.Tensor) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None  # decode_rgb names the file


class GpuCacheLoader(LoaderBase):
    """One split, one rank: the split decoded once onto ``device``; batches augmented there."""

    def __init__(self, spec: LoaderSpec, cfg: GpuCacheConfig) -> None:
        super().__init__(spec)
        self.cfg = cfg
        n, shard, train = self.n, self.shard, self.train
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
        self.labels = torch.tensor(np.asarray(self.index.labels, dtype=np.float32), device=self.device)
        t0 = time.perf_counter()
        self.images = self._build_cache(positions)  # (rows, 3, H, W) uint8 on the device
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the build's time includes its queued kernels
        build_s = time.perf_counter() - t0
        self.build_info: dict = {
            "cache_decoder": self.decoder_name,
            "cache_build_s": build_s,
            "cache_bytes": self.images.numel() * self.images.element_size(),  # this rank's
            "cache_images": len(positions),
        }
        if shard.rank == 0:
            H, W = self.images.shape[-2:]
            print(
                f"gpu_cache: {'train' if train else 'eval'} cache of {len(positions):,} images at {H}x{W} "
                f"on {self.device} built in {build_s:.1f} s ({self.decoder_name}), "
                f"{self.build_info['cache_bytes'] / 2**30:.2f} GiB on this rank",
                file=sys.stderr,
                flush=True,
            )
        # The normalization folded into fused_crop, from base's per-device constants (made once).
        mean, std = mean_std(self.device)
        self.scale = 1.0 / (255.0 * std.view(3))
        self.shift = -mean / std
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------------------------------
    # The cache.

    def _stored_shape(self, positions: np.ndarray, pool: ThreadPoolExecutor) -> tuple[int, int]:
        if not self.train:
            return self.image.size
        shapes = list(pool.map(oriented_size, [self.index.paths[i] for i in positions]))
        self.dominant = Counter(shapes).most_common(1)[0][0]
        h, w = self.dominant
        short = train_short_side(self.image, self.cfg)
        if not self.cfg.short_side:
            short = min(short, h, w)  # no more pixels than the photos have (module docstring)
        # torchvision's rule for resize(short): the longer side is truncated.
        return (short, int(short * w / h)) if h <= w else (int(short * h / w), short)

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        """A decoded (3, h, w) or (b, 3, h, w) uint8 image in the stored form."""
        if not self.train:
            m = self.image
            return eval_transform(img, m.size, m.eval_crop_pct, m.eval_geometry)
        H, W = self.stored
        h, w = img.shape[-2:]
        if (h, w) != self.dominant and h * W != w * H:  # another aspect: center-crop to ours first
            ch, cw = (h, round(h * W / H)) if w * H > h * W else (round(w * H / W), w)
            img = TF.center_crop(img, [ch, cw])
        return TF.resize(img, [H, W], antialias=True)

    def _jpeg_decoder(self, threads: int):
        """DALI's decoder for the build (see the module docstring), or None for torchvision's."""
        from . import dali_available

        cuda = self.device.type == "cuda"
        choice = self.cfg.decoder
        if choice == "auto":
            choice = "dali" if cuda and dali_available() else "torchvision"
        if choice == "dali" and not dali_available():
            raise UserError(
                "data.gpu_cache.decoder=dali but nvidia.dali does not import; install nvidia-dali-cuda130 "
                "(nvidia-dali-cuda120 for CUDA 12 drivers) or set data.gpu_cache.decoder=auto"
            )
        if choice == "torchvision":
            self.decoder_name = f"torchvision {'nvjpeg' if cuda else 'cpu'}"
            return None
        from .dali import JpegDecoder

        self.decoder_name = f"dali {'mixed' if cuda else 'cpu'}"
        return JpegDecoder(self.device, CUDA_DECODE_CHUNK, threads, BUILD_HW_DECODER_LOAD)

    def _build_cache(self, positions: np.ndarray) -> torch.Tensor:
        workers = min(8, usable_cores())
        self._dali = self._jpeg_decoder(workers)
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
                        "data.gpu_cache.short_side or use data.backend=dali"
                    )
            cache = torch.empty((len(positions), 3, H, W), dtype=torch.uint8, device=self.device)
            paths = [self.index.paths[i] for i in positions]
            with Progress("gpu_cache decode", len(paths), "img", enabled=self.shard.rank == 0) as progress:
                self._fill(cache, paths, pool, progress)
        self._dali = None  # its pipeline and buffers are not needed after the build
        return cache

    def _fill(
        self, cache: torch.Tensor, paths: list[Path], pool: ThreadPoolExecutor, progress: Progress
    ) -> None:
        """Decode, fit and store ``paths`` in chunks; the same steps on CPU, where the decoding of a
        chunk is spread over the thread pool instead of one batched nvJPEG call."""
        cuda = self.device.type == "cuda"
        chunks = [paths[s : s + CUDA_DECODE_CHUNK] for s in range(0, len(paths), CUDA_DECODE_CHUNK)]

        def submit(c: int) -> list:
            return [pool.submit(_read, p) for p in chunks[c]]

        # The files of the next two chunks are read (and their headers checked) while one decodes;
        # no further, so that host memory holds at most three chunks of JPEG bytes.
        ahead = deque(submit(c) for c in range(min(2, len(chunks))))
        for c, chunk in enumerate(chunks):
            reads = [f.result() for f in ahead.popleft()]
            if c + 2 < len(chunks):
                ahead.append(submit(c + 2))
            blobs = [blob for blob, _ in reads]
            start = c * CUDA_DECODE_CHUNK
            images: list[torch.Tensor | None] = [None] * len(chunk)
            gpu = [i for i, (blob, cpu_only) in enumerate(reads) if blob and not cpu_only]
            if gpu:
                if cuda:
                    # torchvision's decoder writes from its own stream, unordered with ours (module
                    # docstring): the previous chunk's resize and cache writes finish before it may
                    # reuse their memory. DALI's too, so that both decoders start alike.
                    torch.cuda.synchronize(self.device)
                try:
                    if self._dali is not None:
                        decoded = self._dali([blobs[i] for i in gpu])
                    elif cuda:
                        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu]
                        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                    else:
                        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu]
                        decoded = list(pool.map(_decode_or_none, data))
                except RuntimeError:  # one bad file fails a whole batched call: the CPU pass names it
                    decoded = [None] * len(gpu)
                for i, img in zip(gpu, decoded):
                    images[i] = img
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
            progress.update(len(chunk))
        if cuda:
            torch.cuda.synchronize(self.device)  # the last chunk's kernels before the decoder is freed

    # ------------------------------------------------------------------------------------------
    # Batches.

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device.type == "cuda":
            t = t.pin_memory()  # so the copy is asynchronous
        return t.to(self.device, non_blocking=True)

    def epoch_params(self, epoch: int) -> tuple[np.ndarray, CropPlan]:
        """This rank's (steps, batch) sample positions of the epoch and their crops, on the host."""
        plan = train_plan(self.n, self.batch, self.shard, self.seed, epoch)
        steps, batch = plan.shape
        # The seed of a sample depends on its slot, as in the torch backend: a sample drawn twice
        # (wrap padding) gets two different augmentations.
        slots = plan.astype(np.int64) + np.int64(self.n) * np.arange(steps * batch).reshape(steps, batch)
        seeds = sample_seeds(self.seed, epoch, self.shard.rank, slots.ravel())
        H, W = self.stored
        m = self.image
        return plan, crop_plan(seeds, H, W, m.scale_min, m.hflip, m.vflip, m.rot90, m.size)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if start_step >= self.steps_per_epoch:
            return
        if not self.train:
            lengths = [len(p) for p in self.plan]
            # One host-to-device copy for the whole evaluation, split into per-step views.
            with self._on_side():
                steps = self._to_device(np.concatenate(self.plan).astype(np.int64)).split(lengths)
            yield from self._prefetched(
                lambda s: self._eval_batch(steps[s]), range(start_step, self.steps_per_epoch)
            )
            return
        plan, crops = self.epoch_params(epoch)
        b = self.batch
        with self._on_side():
            idx_all = self._to_device(plan.astype(np.int64))  # (steps, batch)
            params_all = self._to_device(crops.packed())  # (steps * batch, 7)
        transpose = bool(crops.transpose.any())

        def make(step: int) -> Batch:
            idx = idx_all[step]
            with torch.autocast(self.device.type, enabled=False):  # fp16/fp32 products, whatever the caller
                images = fused_crop(
                    self.images,
                    self.row_of[idx],
                    params_all[step * b : (step + 1) * b],
                    self.image.size,
                    self.scale,
                    self.shift,
                    self.channels_last,
                    transpose,
                )
            return Batch(images, self.labels[idx], idx)

        yield from self._prefetched(make, range(start_step, self.steps_per_epoch))

    def _eval_batch(self, idx: torch.Tensor) -> Batch:
        # The torch backend's normalization: on CPU the batch equals its batch bit for bit.
        images = normalize_on_device(
            self.images.index_select(0, self.row_of[idx]), self.device, self.channels_last
        )
        return Batch(images, self.labels[idx], idx)

    def _on_side(self):
        """The side stream on CUDA (after everything queued on the current one), else nothing."""
        if self._side is None:
            return contextlib.nullcontext()
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._side)

    def _prefetched(self, make: Callable[[int], Batch], steps: range) -> Iterator[Batch]:
        """``make(step)`` for each step; on CUDA made on the side stream one step ahead: batch k+1 is
        queued there before batch k is handed out, so it is made while step k trains."""
        if self._side is None:
            for s in steps:
                yield make(s)
            return

        def launch(s: int) -> tuple[Batch, torch.cuda.Event]:
            with self._on_side():
                batch = make(s)
                done = torch.cuda.Event()
                done.record(self._side)
            return batch, done

        ahead = launch(steps[0])
        for k in range(len(steps)):
            batch, done = ahead
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            for t in (batch.images, batch.labels, batch.index):
                t.record_stream(main)  # memory made on the side stream, used on the main one
            if k + 1 < len(steps):
                ahead = launch(steps[k + 1])
            yield batch
