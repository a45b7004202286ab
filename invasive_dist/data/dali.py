"""The DALI backend: one pipeline per loader for its whole life, fed the plan's batches one by one;
JPEG decoding on the GPU (``mixed``) or, without CUDA, the same pipeline on CPU operators
(``device_id=None``).

    spec = LoaderSpec.of(index, cfg.data, Shard(rank, world), device, True, 0, epochs=cfg.train.epochs)
    loader = DaliLoader(spec, cfg.data.dali)  # epochs: the look-ahead never decodes past the last one
    for batch in loader.iter_epoch(epoch, start_step=0): ...

Feeding. The pipeline is built once, in the constructor. Every iteration gets its batch from
``fn.external_source`` inputs that the loader feeds (``feed_input``) before it schedules the
iteration (``schedule_run``): the files' names as UTF-8 bytes, read by ``fn.io.file.read`` on DALI's
CPU threads, and for training each sample's crop window, flips and rotation. The batches are those of
``base.train_plan`` / ``base.eval_plan``, so every backend yields the same indices in the same order.
Why this and not a reader: ``fn.readers.file`` owns the order (an epoch is its file list, so each
epoch or resume meant a new pipeline, as before this module was rewritten) and its augmentation RNG
advances with every iteration run, so skipping batches on resume meant decoding them. Why names and
not the files' bytes: the reads stay on DALI's thread pool (parallel, memory-mapped) instead of the
Python thread that also launches the model's kernels. Measured on this machine's 2 (loaded) cores,
DALI 2.4.0 CPU-only, 256 of the demo's 384x288 JPEGs: the Python thread spends 21 ms per batch
reading and feeding bytes, 6.1 ms feeding a list of names, 2.6 ms feeding them as one dense array
(``_name_table``), which is what this module does. A per-epoch pipeline build cost 4-40 ms here,
and on a GPU a new nvJPEG/hardware-decoder set-up and an empty queue every epoch and evaluation.
Together, on the same loaded cores (configs/demo.yaml, 2 DALI threads, 300 synthetic 384x288 JPEGs):
3 epochs with an evaluation after each ran at 344-357 img/s, against 262-269 img/s with a pipeline
per epoch and per evaluation that also decoded one batch too many each time.

Augmentation is a pure function of (seed, epoch, rank, sample slot): the per-sample seeds are the
torch backend's (``base.sample_seeds`` of the slot), and from each the host draws, vectorized over
the batch (``augment_params``), a random-resized-crop box by torchvision's rule, two coin flips and a
quarter-turn count. The torch backend makes the same kind of draws with a numpy Generator per sample
in its workers; here that would be on the thread that launches the model's kernels, 20.7 ms per
batch of 256 on this loaded machine against 0.45 ms vectorized, so the two backends draw by the same
law but not the same boxes. The image sizes the boxes need are read from the JPEG headers once,
when the loader is built, after EXIF orientation: DALI's box is in upright pixels too (checked in
tests/unit/test_dali.py with a photo stored sideways). DALI then decodes only the box
(``decoders.image_slice``, ROI decoding), resizes it to image_size's (h, w) (antialias), flips (``flip``)
and rotates (``rotate``, multiples of 90 degrees with nearest-neighbour sampling: exact pixel
permutations) as told. No random operator is in the graph, so a batch does
not depend on what the pipeline ran before: resuming at (epoch, step k) feeds batch k first and
decodes none of the k skipped ones, with the augmentations of an uninterrupted run.

Eval: ``decoders.image`` -> ``resize`` (antialias) -> crop and normalize in ``crop_mirror_normalize``.
With ``data.eval_geometry=center_crop`` the resize size and crop offset are computed per image from the
JPEG header the way ``transforms.eval_transform`` computes them (see ``_torchvision_eval_geometry``);
with ``full`` the resize is to (h, w) and the crop cuts nothing. The eval images agree with the torch
backend's to one uint8 level (CPU, measured in tests/unit/test_backends.py and test_fullframe.py),
except, with ``full``, the outermost pixel ring: the frame's own border, where DALI's resampling
clamps and torchvision's renormalizes the cut filter (up to 0.40 normalized there; mean over the
image 0.0020 on the real 1154x866 files at 224 px, against 0.0017 without the ring).
The last batch of a shard is fed short: nothing is padded, nothing decoded twice.

Look-ahead (``data.dali.prefetch`` batches, default 2). The pipeline runs with
``prefetch_queue_depth=1`` and the loader schedules the look-ahead itself: with a deeper queue DALI
runs that many iterations at the first ``schedule_run`` whether or not they exist (a 1-step evaluation
decoded two batches), and with one it accepts any number of scheduled iterations without blocking
(measured: 8 scheduled in 1.6 ms, then decoded in order). Before handing out batch k the loader
schedules up to k + prefetch, and the training loader runs on across the epoch's end into the next
epoch's first batches (what the training loop asks for after the evaluation), but not past
the spec's ``epochs`` when that is set. An evaluation of n batches decodes n. Asked for another batch than
the one at the head of the queue (a resume elsewhere, an abandoned epoch), the loader takes the
queued batches out unused (counted in ``wasted``) and starts again at the one asked for.

Machine-aware settings (``resolve_settings``): CPU threads per pipeline = the cores of this process's
share of the machine (its CPU affinity, capped by a cgroup CPU quota, divided by the processes per
node unless the launcher already bound it to a subset: ``distributed.cores_per_process``), or
``data.dali.threads``; hardware-decoder share ``data.dali.hw_decoder_load``;
``hybrid_huffman_threshold`` (``data.dali.hybrid_huffman_threshold``, auto: see
``auto_huffman_threshold``); ``preallocate_width_hint``/``height_hint`` from the largest image of the
split. Hand-over to torch without a copy: ``torch.from_dlpack`` of DALI's output (with the default
dynamic executor DALI does not reuse an output buffer that is still referenced), bound to torch's
current stream on the GPU. Channels-last output comes from an HWC ``crop_mirror_normalize`` layout,
viewed as NCHW without a copy.

Errors: a missing file, or one whose header cannot be read, is refused when the loader is built; a
file DALI cannot decode stops the pipeline with a message that names no file, so the files of the
batches in flight are checked with torchvision and the UserError names the first bad one.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import cores_per_process
from ..errors import UserError
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    ImageSpec,
    LoaderBase,
    LoaderSpec,
    eval_plan,
    sample_seeds,
    train_plan,
    train_steps,
)
from .transforms import (
    decode_rgb,
    eval_cover_size,
    fallback_box,
    log_ratio_range,
    oriented_size,
    quarter_turns,
)

# DALI's default hybrid_huffman_threshold: images above it use nvJPEG's GPU-assisted Huffman decoder.
DALI_HUFFMAN_THRESHOLD = 1_000_000
# Rough CPU Huffman-decoding rate of a ~1 MP photo per core (an estimate, not measured here) and the
# rate a GPU input pipeline should sustain (ResNet-50 bf16 on an H100: ~4,000 img/s, bench.py).
HUFFMAN_IMG_PER_CORE = 300
TARGET_IMG_PER_GPU = 4000


def auto_huffman_threshold(cores: int, hw_decoder_load: float) -> int:
    """``hybrid_huffman_threshold`` for the images not sent to the hardware decoder: with at most that
    many pixels they are Huffman-decoded on the CPU threads (nvJPEG's host backend), above it with
    nvJPEG's GPU-assisted (hybrid) Huffman decoder, which DALI's docs say still largely uses the CPU
    but less of it. Keep DALI's default (1 MP: the Kaggle 1154x866 = 999,364 px photos stay on the
    host) when the cores can keep up, else 0. E.g. 16 cores, 8 GPUs, load 0.9: 2 cores x 300 =
    600 img/s >= 0.1 x 4,000 = 400, host; at load 0.65 (DALI's default) 1,400 img/s are needed,
    hybrid. The rates are estimates, not measured: ``bench --backend dali:hybrid_huffman_threshold=0``
    measures the other choice."""
    cpu_share = (1.0 - hw_decoder_load) * TARGET_IMG_PER_GPU
    return DALI_HUFFMAN_THRESHOLD if cores * HUFFMAN_IMG_PER_CORE >= cpu_share else 0


@dataclass
class DaliConfig:
    """``data.dali``: the DALI backend's settings."""

    # DALI's own default went back to 0.65 in 2026, for tail latency on small images; ours stays 0.9
    # because on these 1154x866 photos an H100 decoded 5,238 img/s with 1.0 and 1,802 with DALI's
    # default (a prototype script, not this code: docs/performance.md), and the CPU threads that a
    # lower share moves work to also feed the GPU. bench --backend dali:hw_decoder_load=0.65 measures it.
    hw_decoder_load: float = 0.9  # share of JPEG decoding on the GPU's hardware decoder (mixed only)
    threads: int = 0  # CPU threads per pipeline (0 = the cores of this process's share)
    hybrid_huffman_threshold: int = -1  # pixels above which Huffman is GPU-assisted (-1: by cores)
    prefetch: int = 2  # batches decoded ahead of the consumer, across epoch ends too

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            problems.append(f"data.dali.hw_decoder_load={self.hw_decoder_load} must be in [0, 1]")
        if self.threads < 0 or self.prefetch < 0:
            problems.append(
                f"data.dali.threads={self.threads} and data.dali.prefetch={self.prefetch} must be >= 0"
            )
        if self.hybrid_huffman_threshold < -1:
            problems.append(
                f"data.dali.hybrid_huffman_threshold={self.hybrid_huffman_threshold} must be >= -1 (-1 = auto)"
            )
        return problems


@dataclass(frozen=True)
class DaliSettings:
    """What a pipeline is built with, resolved from ``data.dali`` and the machine."""

    threads: int  # DALI CPU threads of the pipeline
    prefetch: int  # batches scheduled ahead of the one handed out
    hw_decoder_load: float  # share of the JPEGs on the hardware decoder (mixed only)
    hybrid_huffman_threshold: int  # pixels above which Huffman decoding is GPU-assisted (mixed only)
    width_hint: int  # preallocate_width_hint: widest image of the split
    height_hint: int  # preallocate_height_hint: tallest image of the split


def resolve_settings(cfg: DaliConfig, sizes: np.ndarray) -> DaliSettings:
    """``sizes``: (N, 2) oriented (height, width) of the split's images."""
    cores = cores_per_process()
    threads = cfg.threads or cores
    threshold = cfg.hybrid_huffman_threshold
    if threshold < 0:
        threshold = auto_huffman_threshold(cores, cfg.hw_decoder_load)
    return DaliSettings(
        threads=threads,
        prefetch=cfg.prefetch,
        hw_decoder_load=cfg.hw_decoder_load,
        hybrid_huffman_threshold=threshold,
        width_hint=int(sizes[:, 1].max()),
        height_hint=int(sizes[:, 0].max()),
    )


def _name_table(paths: list[str]) -> np.ndarray:
    """(N, L) uint8: each file's absolute path in UTF-8, left-padded with "/" to one length (on Linux
    any number of leading slashes names the root), so a batch of names is one dense array: feeding
    it cost 2.6 ms per batch of 256 against 6.1 ms for a list of per-file arrays (2 loaded cores)."""
    encoded = [os.path.abspath(p).encode("utf-8") for p in paths]
    width = max(len(e) for e in encoded)
    return np.frombuffer(b"".join(e.rjust(width, b"/") for e in encoded), dtype=np.uint8).reshape(
        len(paths), width
    )


@dataclass
class AugmentParams:
    """Per-sample training augmentation of a batch, in input-image pixels (after EXIF orientation)."""

    top: np.ndarray  # (B,) float32 crop box
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    hflip: np.ndarray  # (B,) bool
    vflip: np.ndarray
    quarter_turns: np.ndarray  # (B,) int: counter-clockwise rotation by 90 degrees times this


TRIES = 10  # random-resized-crop attempts before the centred fallback box, as torchvision


def _uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """(B, count) uniforms in [0, 1), a pure function of each 63-bit seed: SplitMix64 of the seed's
    Weyl sequence, vectorized over the batch (a numpy Generator per sample is ~80 times slower)."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64)[:, None] + np.uint64(0x9E3779B97F4A7C15) * np.arange(
            1, count + 1, dtype=np.uint64
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def augment_params(sizes: np.ndarray, seeds: np.ndarray, image: ImageSpec) -> AugmentParams:
    """Random-resized crops as torchvision draws them (area in [scale_min, 1] of the image,
    log-uniform aspect in ``transforms.log_ratio_range`` of the input size, the first of 10 tries
    that fits, else ``transforms.fallback_box``), coin flips and turns (``transforms.quarter_turns``),
    for a batch: ``sizes`` (B, 2) oriented (height, width), ``seeds`` the per-sample seeds
    (``base.sample_seeds``). The draws are made whatever the config, so a crop does not depend on
    whether flips or rotations are on."""
    hw = image.size
    log_ratio = log_ratio_range(hw)
    h, w = sizes[:, :1].astype(np.float64), sizes[:, 1:].astype(np.float64)
    u = _uniforms(seeds, 2 * TRIES + 5)
    area = h * w * (image.scale_min + (1.0 - image.scale_min) * u[:, :TRIES])
    ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, TRIES : 2 * TRIES])
    cw, ch = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = fits.argmax(1)[:, None]  # the first try that fits
    found = fits.any(1)
    fb = np.array([fallback_box(int(a), int(b), hw) for a, b in sizes[~found]], dtype=np.float64)
    fb_h, fb_w = np.zeros(len(sizes)), np.zeros(len(sizes))
    if len(fb):
        fb_h[~found], fb_w[~found] = fb[:, 0], fb[:, 1]
    cw = np.where(found, np.take_along_axis(cw, first, 1)[:, 0], fb_w)
    ch = np.where(found, np.take_along_axis(ch, first, 1)[:, 0], fb_h)
    h, w = h[:, 0], w[:, 0]
    r = u[:, 2 * TRIES :]
    top = np.where(found, np.minimum(np.floor(r[:, 0] * (h - ch + 1)), h - ch), (h - ch) // 2)
    left = np.where(found, np.minimum(np.floor(r[:, 1] * (w - cw + 1)), w - cw), (w - cw) // 2)
    f32 = np.float32
    return AugmentParams(
        top=top.astype(f32),
        left=left.astype(f32),
        height=ch.astype(f32),
        width=cw.astype(f32),
        hflip=r[:, 2] < 0.5,
        vflip=r[:, 3] < 0.5,
        quarter_turns=quarter_turns(r[:, 4], hw),
    )


def _torchvision_eval_geometry(jpegs, cover: tuple[int, int], hw: tuple[int, int]):
    """Per-sample (resize_x, resize_y, crop_pos_x, crop_pos_y) that reproduce
    ``transforms.eval_transform``'s centre crop: resize to ``transforms.eval_resized_shape`` (the
    smallest scaling that covers ``cover`` = (height, width), the other side truncated as
    torchvision truncates, ``int(rh * w / h)``) and ``center_crop(hw)``, whose offset is Python's
    ``round((n - size) / 2)``, halves to the even neighbour. DALI's own ``resize_shorter`` keeps a
    fractional scale and its 0.5 crop rounds halves up; either is a pixel off, which on real photos
    costs about 15 levels of mean difference."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    # (H, W, C) after EXIF orientation, from the encoded file: CPU-only, whatever decodes it.
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32)
    h, w = shape[0], shape[1]
    rh, rw = cover
    height_binds, width_binds = rh * w >= rw * h, rh * w < rw * h
    new_h = rh * height_binds + ((rw * h) // w) * width_binds
    new_w = rw * width_binds + ((rh * w) // h) * height_binds

    def crop_pos(n, size):
        d = n - size
        k = d // 2
        offset = k + (d - 2 * k) * (k - 2 * (k // 2))  # d odd and k odd: round half to even is k + 1
        return offset / dmath.max(d, 1)  # DALI's anchor is round(crop_pos * d): back to offset

    return (
        fn.cast(new_w, dtype=types.FLOAT),
        fn.cast(new_h, dtype=types.FLOAT),
        crop_pos(new_w, hw[1]),
        crop_pos(new_h, hw[0]),
    )


class JpegDecoder:
    """Whole JPEGs decoded by DALI, a batch per call, for gpu_cache's build: ``mixed`` (nvJPEG and the
    GPU's hardware JPEG engines) on CUDA, DALI's CPU decoder with ``device=cpu`` (device_id=None),
    the same pipeline otherwise.

        decode = JpegDecoder(device, max_batch=64, threads=8, hw_decoder_load=1.0)
        images = decode([blob, ...])  # (3, h, w) uint8 views on ``device``, RGB, EXIF orientation applied

    The outputs are DALI's buffers, used in place (``torch.from_dlpack``): on CUDA ready on torch's
    current stream; with the dynamic executor DALI does not reuse a buffer that is still referenced.
    A file DALI cannot decode raises RuntimeError (its message names no file), after which the
    pipeline is rebuilt at the next call."""

    def __init__(self, device: torch.device, max_batch: int, threads: int, hw_decoder_load: float) -> None:
        self.device = device
        self.max_batch = max_batch
        self.threads = threads
        self.hw_decoder_load = hw_decoder_load
        self._pipe = None

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        decoder = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}

        def graph():
            jpegs = fn.external_source(name=NAMES, dtype=types.UINT8, ndim=1)
            return fn.decoders.image(jpegs, output_type=types.RGB, **decoder)

        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._pipe = pipeline_def(graph)(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=device_id,
            prefetch_queue_depth=1,  # one call, one iteration: nothing decoded ahead
            exec_dynamic=True,  # outputs stay valid while referenced
        )
        self._pipe.build()

    def __call__(self, blobs: list[bytes]) -> list[torch.Tensor]:
        if not blobs:
            return []
        if len(blobs) > self.max_batch:
            raise ValueError(f"{len(blobs)} files in one call, more than max_batch={self.max_batch}")
        if self._pipe is None:
            self._build()
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            self._pipe.feed_input(NAMES, [np.frombuffer(b, dtype=np.uint8) for b in blobs])
            self._pipe.schedule_run()
            (out,) = self._pipe.outputs(stream)
        except RuntimeError:
            self._pipe = None  # unusable after a failure
            raise
        images = []
        for i in range(len(blobs)):
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    hwc = torch.from_dlpack(out[i])
            else:
                hwc = torch.from_dlpack(out[i])
            images.append(hwc.permute(2, 0, 1))  # (3, h, w), a view
        return images


# Names of the external_source inputs fed per iteration.
NAMES, ANCHOR, SHAPE, HFLIP, VFLIP, ANGLE = "names", "anchor", "shape", "hflip", "vflip", "angle"


def _graph(train: bool, gpu: bool, image: ImageSpec, settings: DaliSettings, channels_last: bool):
    """The pipeline's graph (``pipeline_def`` makes it a pipeline in ``DaliLoader._build``)."""
    from nvidia.dali import fn, types

    names = fn.external_source(name=NAMES, dtype=types.UINT8, ndim=1)
    jpegs = fn.io.file.read(names)
    decoder = {"device": "cpu"}
    if gpu:
        decoder = {
            "device": "mixed",
            "hw_decoder_load": settings.hw_decoder_load,
            "hybrid_huffman_threshold": settings.hybrid_huffman_threshold,
            "preallocate_width_hint": settings.width_hint,
            "preallocate_height_hint": settings.height_hint,
        }
    hw = image.size
    if train:
        anchor = fn.external_source(name=ANCHOR, dtype=types.FLOAT, ndim=1)  # (left, top)
        shape = fn.external_source(name=SHAPE, dtype=types.FLOAT, ndim=1)  # (width, height)
        images = fn.decoders.image_slice(
            jpegs,
            anchor,
            shape,
            normalized_anchor=False,
            normalized_shape=False,
            axis_names="WH",
            output_type=types.RGB,
            **decoder,
        )
        images = fn.resize(images, resize_x=hw[1], resize_y=hw[0], antialias=True)
        if image.hflip or image.vflip:
            images = fn.flip(
                images,
                horizontal=fn.external_source(name=HFLIP, dtype=types.INT32, ndim=0) if image.hflip else 0,
                vertical=fn.external_source(name=VFLIP, dtype=types.INT32, ndim=0) if image.vflip else 0,
            )
        if image.rot90:
            # Counter-clockwise by 90 k degrees = torch.rot90(k, dims=(H, W)), as the torch backend
            # (k even for a non-square size, so keep_size never cuts).
            angle = fn.external_source(name=ANGLE, dtype=types.FLOAT, ndim=0)
            images = fn.rotate(images, angle=angle, interp_type=types.INTERP_NN, keep_size=True)
        crop_pos_x = crop_pos_y = 0.5  # the image is already image_size
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        if image.eval_geometry == "full":  # the whole frame to (h, w): the crop below cuts nothing
            resize_x, resize_y, crop_pos_x, crop_pos_y = float(hw[1]), float(hw[0]), 0.5, 0.5
        else:
            resize_x, resize_y, crop_pos_x, crop_pos_y = _torchvision_eval_geometry(
                jpegs, eval_cover_size(hw, image.eval_crop_pct), hw
            )
        images = fn.resize(images, resize_x=resize_x, resize_y=resize_y, antialias=True, subpixel_scale=False)
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        # HWC output is an NHWC batch: permuted to NCHW it is channels_last without a copy.
        output_layout="HWC" if channels_last else "CHW",
        crop=hw,  # (height, width)
        crop_pos_x=crop_pos_x,
        crop_pos_y=crop_pos_y,
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[s * 255 for s in IMAGENET_STD],
    )


@dataclass
class _Scheduled:
    """A batch fed to the pipeline and scheduled, not yet handed out."""

    key: tuple[int, int]  # (epoch, step)
    positions: np.ndarray  # sample positions in the DataIndex


class DaliLoader(LoaderBase):
    """One split, one rank: one DALI pipeline, built here; ``iter_epoch`` feeds it the plan's batches
    and yields device batches. ``builds``, ``decoded`` and ``wasted`` count pipeline builds, batches
    scheduled and scheduled batches taken out unused."""

    def __init__(self, spec: LoaderSpec, cfg: DaliConfig) -> None:
        super().__init__(spec)
        self.epochs = spec.epochs  # the look-ahead stops at the end of the last epoch (None: no end)
        self.gpu = self.device.type == "cuda"
        n, index, shard = self.n, self.index, self.shard
        missing = [p for p in index.paths if not os.path.isfile(p)]
        if missing:
            raise UserError(
                f"{missing[0]}: image file is missing ({len(missing)} of {n} files of the split are); "
                "run `invasive-dist check-data`"
            )
        self.paths = [str(p) for p in index.paths]
        self._names = _name_table(self.paths)
        with ThreadPoolExecutor(min(8, cores_per_process() * 2)) as pool:
            # (height, width) after EXIF orientation, from the headers: the crop boxes need them.
            self.sizes = np.array(list(pool.map(oriented_size, index.paths)), dtype=np.int64)
        self.settings = resolve_settings(cfg, self.sizes)
        self.labels = torch.tensor(np.asarray(index.labels, dtype=np.float32), device=self.device)
        if self.train:
            self.steps_per_epoch = train_steps(n, self.batch, shard)
        else:
            self._eval_plan = eval_plan(n, self.batch, shard)
            self.steps_per_epoch = len(self._eval_plan)
        self._train_plans: dict[int, np.ndarray] = {}
        self._queue: deque[_Scheduled] = deque()
        self._next: tuple[int, int] | None = None  # the batch after the last scheduled one
        self.builds = self.decoded = self.wasted = 0
        self._pipe = None
        self._build()

    # ------------------------------------------------------------------------------------------
    # The pipeline.

    def _build(self) -> None:
        from nvidia.dali import pipeline_def

        self._pipe = pipeline_def(_graph)(
            self.train,
            self.gpu,
            self.image,
            self.settings,
            self.channels_last,
            batch_size=self.batch,
            num_threads=self.settings.threads,
            device_id=self._device_id(),
            seed=0,  # no random operator in the graph: the host draws every augmentation
            prefetch_queue_depth=1,  # the loader schedules its own look-ahead (module docstring)
            exec_dynamic=True,  # outputs stay valid while referenced: zero-copy hand-over
        )
        self._pipe.build()
        self.builds += 1
        self._queue.clear()
        self._next = None

    def _device_id(self) -> int | None:
        if not self.gpu:
            return None  # CPU-only pipeline
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    # ------------------------------------------------------------------------------------------
    # Plans and per-sample parameters.

    def _positions(self, key: tuple[int, int]) -> np.ndarray:
        epoch, step = key
        if not self.train:
            return self._eval_plan[step]
        if epoch not in self._train_plans:
            if len(self._train_plans) > 2:  # at most this epoch and the next are being fed
                self._train_plans.pop(min(self._train_plans))
            self._train_plans[epoch] = train_plan(self.n, self.batch, self.shard, self.seed, epoch)
        return self._train_plans[epoch][step]

    def _after(self, key: tuple[int, int]) -> tuple[int, int] | None:
        """The batch the consumer asks for after ``key``: the next step, or the next epoch's first
        (training only, and not past ``epochs``)."""
        epoch, step = key
        if step + 1 < self.steps_per_epoch:
            return epoch, step + 1
        if self.train and (self.epochs is None or epoch + 1 < self.epochs):
            return epoch + 1, 0
        return None

    def train_params(self, key: tuple[int, int], positions: np.ndarray) -> dict[str, np.ndarray]:
        """The pipeline inputs that augment a training batch: crop windows, flips, angles."""
        epoch, step = key
        # The slot of a sample in the epoch, as the torch backend numbers it (TorchLoader._plan): a
        # sample drawn twice (wrap padding) gets two augmentations.
        slots = positions.astype(np.int64) + np.int64(self.n) * (
            step * self.batch + np.arange(len(positions))
        )
        p = augment_params(
            self.sizes[positions], sample_seeds(self.seed, epoch, self.shard.rank, slots), self.image
        )
        params = {ANCHOR: np.stack([p.left, p.top], 1), SHAPE: np.stack([p.width, p.height], 1)}
        if self.image.hflip:
            params[HFLIP] = p.hflip.astype(np.int32)
        if self.image.vflip:
            params[VFLIP] = p.vflip.astype(np.int32)
        if self.image.rot90:
            params[ANGLE] = (90.0 * p.quarter_turns).astype(np.float32)
        return params

    # ------------------------------------------------------------------------------------------
    # Feeding and taking.

    def _schedule(self, key: tuple[int, int]) -> None:
        positions = self._positions(key)
        pipe = self._pipe
        pipe.feed_input(NAMES, self._names[positions])
        if self.train:
            for name, value in self.train_params(key, positions).items():
                pipe.feed_input(name, value)
        pipe.schedule_run()
        self.decoded += 1
        self._queue.append(_Scheduled(key, positions))

    def _outputs(self, stream):
        try:
            return self._pipe.outputs(stream)
        except RuntimeError as e:
            # The pipeline is unusable after a failure: the next use builds a new one.
            in_flight = [item.positions for item in self._queue]
            self._pipe = None
            self._queue.clear()
            raise self._data_error(e, in_flight) from None

    def _take(self, key: tuple[int, int], stream) -> tuple[object, _Scheduled]:
        """The pipeline output of batch ``key``, after scheduling the look-ahead behind it."""
        if self._pipe is None:
            self._build()
        if self._queue and self._queue[0].key != key:
            # Not the batch the queue expected (resume elsewhere, an epoch left early): the queued
            # batches are taken out unused. DALI runs iterations in order, so this waits for them.
            for _ in range(len(self._queue)):
                self._outputs(None)
                self._queue.popleft()
                self.wasted += 1
        if not self._queue:
            self._next = key
        while len(self._queue) <= self.settings.prefetch and self._next is not None:
            self._schedule(self._next)
            self._next = self._after(self._next)
        item = self._queue[0]
        out = self._outputs(stream)[0]
        self._queue.popleft()
        return out, item

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        for step in range(start_step, self.steps_per_epoch):
            images, item = self._take((epoch, step), stream)
            yield self._to_batch(images, item.positions)

    def _to_batch(self, images, positions: np.ndarray) -> Batch:
        tensor = images.as_tensor()
        if self.gpu:
            with torch.cuda.device(self.device):
                out = torch.from_dlpack(tensor)  # DALI's buffer, ready on torch's current stream
        else:
            out = torch.from_dlpack(tensor)
        if self.channels_last:
            out = out.permute(0, 3, 1, 2)  # NHWC storage = NCHW in channels_last memory format
        index = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        if self.gpu:
            index = index.pin_memory().to(self.device, non_blocking=True)  # no host sync
        return Batch(images=out, labels=self.labels[index], index=index)

    def _data_error(self, err: RuntimeError, in_flight: list[np.ndarray]) -> Exception:
        """A UserError naming the file behind DALI's failure, or the original error (a bug). DALI's
        message names no file (measured with DALI 2.4.0), so the files of the batches in flight, the
        failing one among them, are decoded with torchvision."""
        candidates = dict.fromkeys(int(p) for positions in in_flight for p in positions)
        for i in candidates:
            if self.paths[i] in str(err):
                return UserError(f"{self.paths[i]}: DALI cannot read this image ({str(err).strip()})")
        for i in candidates:
            try:
                decode_rgb(self.index.paths[i])
            except UserError as bad:
                return UserError(f"DALI pipeline failed: {bad}")
        return err
