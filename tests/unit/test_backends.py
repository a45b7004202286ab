"""The backends yield the same kind of batch, and the deterministic eval path gives the same pixels.

Measured here (CPU, DALI 2.4.0, torchvision 0.29.1), eval images against the torch backend, in
normalized units (one uint8 level is 1/255/std = 0.0171 to 0.0175 depending on the channel):

- dali: mean |diff| 0.0024 (tiny synthetic set, 32 px) and 0.0018 (real 1154x866 files, 224 px);
  99th percentile and max 0.0175 in both: 10-14 % of the values differ, each by one uint8 level.
  The JPEG decoding is identical (both libjpeg-turbo); the resize kernels differ in rounding only,
  because the DALI pipeline reproduces torchvision's output size (truncated longer side) and
  center-crop offset (Python rounding). With DALI's own resize_shorter and 0.5 crop position the
  image is shifted by up to a pixel and the mean difference was 0.26 (real) to 0.33 (tiny).
- gpu_cache: 0 (its eval cache is made by the torch backend's own transform).
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest
import torch

from invasive_dist.config import DataConfig
from invasive_dist.data import ImageSpec, dali_available
from invasive_dist.data.base import IMAGENET_MEAN, IMAGENET_STD, Shard
from invasive_dist.data.dali import DaliConfig
from invasive_dist.data.gpu_cache import GpuCacheConfig, train_short_side
from invasive_dist.data.kaggle import DataIndex, train_index
from invasive_dist.data.torch_backend import TorchConfig
from invasive_dist.errors import UserError

from ..loaders import make_loader

CPU = torch.device("cpu")
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")

# Eval tolerances against the torch backend (measured values in the module docstring).
DALI_EVAL_MEAN_TOL = 0.005
DALI_EVAL_P99_TOL = 0.0176  # one uint8 level
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD) + 1e-4


def cfg(size: int = 32, **kw) -> DataConfig:
    kw.setdefault("eval_geometry", "center_crop")  # the tolerances above; full's: test_fullframe.py
    # num_workers=0: in-process decoding; batches equal any worker count's (test_watchdog checks 2).
    return DataConfig(
        image_size=size, batch_size=8, torch=TorchConfig(num_workers=0), dali=DaliConfig(threads=1), **kw
    )


def all_batches(loader, epoch: int = 0):
    batches = list(loader.iter_epoch(epoch))
    return (
        torch.cat([b.images for b in batches]),
        torch.cat([b.labels for b in batches]),
        torch.cat([b.index for b in batches]),
    )


@pytest.fixture(scope="module")
def index(tiny_data) -> DataIndex:
    return train_index(tiny_data, limit=24)


def copy_split(src: DataIndex, dst, names: list[str]) -> DataIndex:
    """A writable copy of some images of ``src`` in the Kaggle layout under ``dst``."""
    (dst / "train").mkdir(parents=True)
    pos = [src.names.index(n) for n in names]
    for i in pos:
        shutil.copy(src.paths[i], dst / "train" / f"{src.names[i]}.jpg")
    rows = [f"{src.names[i]},{src.labels[i]}" for i in pos]
    (dst / "train_labels.csv").write_text("name,invasive\n" + "\n".join(rows) + "\n")
    return train_index(dst)


# Each backend as the registry builds it: make(index, data_config, shard, device, train, seed, ...).
BACKENDS = {
    "torch": functools.partial(make_loader, "torch"),
    "dali": pytest.param(functools.partial(make_loader, "dali"), marks=needs_dali),
    "gpu_cache": functools.partial(make_loader, "gpu_cache"),
    "synthetic": functools.partial(make_loader, "synthetic"),
}


@pytest.mark.parametrize("make", BACKENDS.values(), ids=BACKENDS.keys())
@pytest.mark.parametrize("train", [True, False])
def test_batches_have_the_contract_shape_dtype_and_layout(index, make, train):
    for channels_last in (False, True):
        loader = make(index, cfg(), Shard(0, 1), CPU, train, 0, channels_last=channels_last)
        b = next(iter(loader.iter_epoch(0)))
        batch = 8 if train else 16
        assert b.images.shape == (batch, 3, 32, 32) and b.images.dtype == torch.float32
        assert b.images.device == CPU and b.labels.device == CPU and b.index.device == CPU
        assert b.labels.shape == b.index.shape == (batch,)
        assert b.labels.dtype == torch.float32 and b.index.dtype == torch.int64
        assert torch.isfinite(b.images).all()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert b.images.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("make", [BACKENDS["dali"], BACKENDS["gpu_cache"]], ids=["dali", "gpu_cache"])
def test_train_batches_are_normalized_like_the_torch_backend(index, make):
    """Same normalization: per-channel statistics of augmented epochs agree with the reference."""
    ref, _, _ = all_batches(make_loader("torch", index, cfg(), Shard(), CPU, True, 0))
    got, _, _ = all_batches(make(index, cfg(), Shard(), CPU, True, 0))
    torch.testing.assert_close(got.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=0.1, rtol=0)
    torch.testing.assert_close(got.std((0, 2, 3)), ref.std((0, 2, 3)), atol=0.1, rtol=0)
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (got.amin((0, 2, 3)) >= lo - 1e-4).all() and (got.amax((0, 2, 3)) <= hi + 1e-4).all()


@needs_dali
def test_dali_eval_matches_torch(index):
    ref, ref_labels, ref_index = all_batches(make_loader("torch", index, cfg(), Shard(), CPU, False, 0))
    got, labels, pos = all_batches(make_loader("dali", index, cfg(), Shard(), CPU, False, 0))
    assert torch.equal(pos, ref_index) and torch.equal(labels, ref_labels)
    diff = (got - ref).abs()
    assert diff.mean() < DALI_EVAL_MEAN_TOL, diff.mean()
    assert diff.flatten().quantile(0.99) <= DALI_EVAL_P99_TOL
    assert diff.max() <= ONE_LEVEL


def test_gpu_cache_eval_equals_torch(index):
    ref, ref_labels, ref_index = all_batches(make_loader("torch", index, cfg(), Shard(0, 2), CPU, False, 0))
    got, labels, pos = all_batches(make_loader("gpu_cache", index, cfg(), Shard(0, 2), CPU, False, 0))
    assert torch.equal(pos, ref_index) and torch.equal(labels, ref_labels)
    assert torch.equal(got, ref)


def test_gpu_cache_stored_size(index):
    d = cfg()  # 32 / sqrt(0.35) = 54.1 -> 55; eval needs round(32 / 0.875) = 37
    assert train_short_side(ImageSpec.from_config(d), d.gpu_cache) == 55
    # 224 px, scale_min 0.35: the documented default
    assert train_short_side(ImageSpec.from_config(DataConfig()), GpuCacheConfig()) == 379
    loader = make_loader("gpu_cache", index, d, Shard(), CPU, True, 0)
    assert loader.images.shape == (len(index), 3, 55, 73)  # 96x72 images: 55 x int(55 * 96 / 72)
    assert loader.images.dtype == torch.uint8
    loader = make_loader(
        "gpu_cache", index, cfg(gpu_cache=GpuCacheConfig(short_side=40)), Shard(), CPU, True, 0
    )
    assert loader.images.shape[-2:] == (40, 53)
    # 64 px would want 109 (64 / sqrt(0.35)): no more than the photos' own 72 is stored, unless asked.
    assert make_loader("gpu_cache", index, cfg(64), Shard(), CPU, True, 0).images.shape[-2:] == (72, 96)
    asked = cfg(64, gpu_cache=GpuCacheConfig(short_side=100))
    assert make_loader("gpu_cache", index, asked, Shard(), CPU, True, 0).images.shape[-2:] == (100, 133)
    # Eval stores the final crops of this rank's shard only.
    loader = make_loader("gpu_cache", index, d, Shard(1, 2), CPU, False, 0)
    assert loader.images.shape == (len(index) // 2, 3, 32, 32)


def test_gpu_cache_other_aspect_is_cropped_not_squashed(index, tmp_path):
    from PIL import Image

    sub = copy_split(index, tmp_path, index.names[:4])
    img = Image.open(sub.paths[0])
    img.crop((0, 0, 48, 72)).save(sub.paths[0], quality=95)  # portrait among landscapes
    loader = make_loader("gpu_cache", sub, cfg(), Shard(), CPU, True, 0)
    assert loader.images.shape == (4, 3, 55, 73)
    assert len(list(loader.iter_epoch(0))) == loader.steps_per_epoch


def test_synthetic_follows_the_torch_plan(index):
    for train in (True, False):
        ref = make_loader("torch", index, cfg(), Shard(1, 2), CPU, train, 0)
        syn = make_loader("synthetic", index, cfg(), Shard(1, 2), CPU, train, 0)
        assert syn.steps_per_epoch == ref.steps_per_epoch
        for a, b in zip(syn.iter_epoch(2), ref.iter_epoch(2)):
            assert torch.equal(a.index, b.index) and a.images.shape == b.images.shape
            assert set(a.labels.tolist()) <= {0.0, 1.0}


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_dali_corrupt_jpeg_is_a_user_error_naming_the_file(index, tmp_path, train):
    sub = copy_split(index, tmp_path, index.names[:12])
    bad = sub.paths[7]
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(b"\xff\xda")])  # a readable header, then no scan
    loader = make_loader("dali", sub, cfg(), Shard(0, 1), CPU, train, 0)  # the header reads: built
    with pytest.raises(UserError, match=str(bad)):
        list(loader.iter_epoch(0))
    bad.write_bytes(data[:300])  # no readable header: refused when the loader is built
    with pytest.raises(UserError, match=str(bad)):
        make_loader("dali", sub, cfg(), Shard(0, 1), CPU, train, 0)


def test_missing_file_is_a_user_error_naming_the_file(index, tmp_path):
    sub = copy_split(index, tmp_path, index.names[:6])
    sub.paths[2].unlink()
    for backend in ["gpu_cache"] + (["dali"] if dali_available() else []):
        with pytest.raises(UserError, match=str(sub.paths[2])):
            make_loader(backend, sub, cfg(), Shard(0, 1), CPU, False, 0)


def test_gpu_cache_corrupt_jpeg_is_a_user_error_naming_the_file(index, tmp_path):
    sub = copy_split(index, tmp_path, index.names[:6])
    sub.paths[3].write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 50)
    for train in (True, False):
        with pytest.raises(UserError, match=str(sub.paths[3])):
            make_loader("gpu_cache", sub, cfg(), Shard(0, 1), CPU, train, 0)


@needs_dali
def test_dali_cpu_pipeline_on_real_files(real_sample):
    """The real 1154x866 competition JPEGs through the CPU-only DALI pipeline at the real 224 px."""
    idx = train_index(real_sample)
    # num_workers=0: DALI has no DataLoader workers.
    d = DataConfig(
        image_size=224, batch_size=4, torch=TorchConfig(num_workers=0), rot90=True, dali=DaliConfig(threads=2)
    )
    d.eval_geometry = "center_crop"  # the tolerances below are center_crop's (full: test_fullframe)
    got, labels, pos = all_batches(make_loader("dali", idx, d, Shard(0, 2), CPU, False, 0))
    ref, _, ref_pos = all_batches(make_loader("torch", idx, d, Shard(0, 2), CPU, False, 0))
    assert got.shape == (5, 3, 224, 224) and torch.equal(pos, ref_pos)
    np.testing.assert_array_equal(labels.numpy(), idx.labels[pos.numpy()])
    diff = (got - ref).abs()
    assert diff.mean() < DALI_EVAL_MEAN_TOL and diff.max() <= ONE_LEVEL  # measured: 0.0018 and 0.0175
    train = next(iter(make_loader("dali", idx, d, Shard(1, 2), CPU, True, 0).iter_epoch(0)))
    assert train.images.shape == (4, 3, 224, 224)
    assert 0.5 < float(train.images.std()) < 1.5


def test_gpu_cache_on_real_files(real_sample):
    idx = train_index(real_sample)
    # num_workers=0: gpu_cache has no DataLoader workers; the torch reference decodes in-process.
    d = DataConfig(image_size=224, batch_size=4, torch=TorchConfig(num_workers=0))
    got, _, pos = all_batches(make_loader("gpu_cache", idx, d, Shard(1, 2), CPU, False, 0))
    ref, _, ref_pos = all_batches(make_loader("torch", idx, d, Shard(1, 2), CPU, False, 0))
    assert torch.equal(pos, ref_pos) and torch.equal(got, ref)
    loader = make_loader("gpu_cache", idx, d, Shard(0, 2), CPU, True, 0)
    assert loader.images.shape == (10, 3, 379, 505)  # 1154x866 stored at the default short side
    train = next(iter(loader.iter_epoch(0)))
    assert train.images.shape == (4, 3, 224, 224) and 0.5 < float(train.images.std()) < 1.5
