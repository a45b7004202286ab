"""DALI ``mixed`` decoding and the gpu_cache backend on CUDA yield the same kind of batch as on CPU.

Skipped without CUDA (and the DALI tests without nvidia.dali). Run on a GPU machine with
``pytest -m gpu tests/gpu`` (``bash tests/gpu_check.sh`` runs them with the benchmarks). The eval tolerances against the CPU torch
backend are wider than the CPU tests' one uint8 level: nvJPEG (and the hardware decoder) and the GPU
resize kernels round differently from libjpeg-turbo and torchvision's CPU resize.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invasive_dist.config import DataConfig
from invasive_dist.data import dali_available
from invasive_dist.data.base import Shard
from invasive_dist.data.dali import DaliConfig
from invasive_dist.data.kaggle import DataIndex, train_index
from invasive_dist.data.torch_backend import TorchConfig

from ..loaders import make_loader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")
EVAL_MEAN_TOL = 0.05  # normalized units; 0.0174 is one uint8 level


def cfg(**kw) -> DataConfig:
    # num_workers=0: the torch reference decodes in-process; its batches equal any worker count's.
    return DataConfig(
        image_size=64, batch_size=8, torch=TorchConfig(num_workers=0), dali=DaliConfig(threads=2), **kw
    )


BACKENDS = [pytest.param("dali", marks=needs_dali), "gpu_cache"]


@pytest.fixture(scope="module")
def index(tiny_data) -> DataIndex:
    return train_index(tiny_data, limit=40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_cuda_batches_match_the_contract(index, backend, train):
    dev = torch.device("cuda", torch.cuda.current_device())
    world = 2
    seen = []
    for rank in range(world):
        loader = make_loader(
            backend, index, cfg(rot90=True), Shard(rank, world), dev, train, 0, channels_last=True
        )
        batches = list(loader.iter_epoch(1))
        assert len(batches) == loader.steps_per_epoch
        for b in batches:
            assert b.images.device == dev and b.labels.device == dev and b.index.device == dev
            assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, 64, 64)
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            assert b.labels.dtype == torch.float32 and b.index.dtype == torch.int64
            assert torch.isfinite(b.images).all()
            pos = b.index.cpu().numpy()
            np.testing.assert_array_equal(b.labels.cpu().numpy(), index.labels[pos].astype(np.float32))
            seen.append(pos)
    np.testing.assert_array_equal(np.unique(np.concatenate(seen)), np.arange(len(index)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_eval_is_close_to_the_cpu_torch_backend(index, backend, measured):
    dev = torch.device("cuda", torch.cuda.current_device())
    ref = list(make_loader("torch", index, cfg(), Shard(), torch.device("cpu"), False, 0).iter_epoch(0))
    got = list(make_loader(backend, index, cfg(), Shard(), dev, False, 0).iter_epoch(0))
    ref_images = torch.cat([b.images for b in ref])
    got_images = torch.cat([b.images.cpu() for b in got])
    assert torch.equal(torch.cat([b.index.cpu() for b in got]), torch.cat([b.index for b in ref]))
    diff = (got_images - ref_images).abs()
    mean = diff.mean().item()
    measured(
        f"{backend} CUDA vs torch CPU eval, p99 |diff| (normalized)",
        diff.flatten().quantile(0.99).item(),
        "none",
        True,
    )
    line = measured(
        f"{backend} CUDA vs torch CPU eval, mean |diff| (normalized)",
        mean,
        f"< {EVAL_MEAN_TOL}",
        mean < EVAL_MEAN_TOL,
    )
    assert mean < EVAL_MEAN_TOL, line


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_train_is_deterministic_and_resumable(index, backend):
    dev = torch.device("cuda", torch.cuda.current_device())
    loader = make_loader(backend, index, cfg(), Shard(0, 1), dev, True, 0)
    full = list(loader.iter_epoch(2))
    tail = list(loader.iter_epoch(2, start_step=2))
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.index, b.index)
        torch.testing.assert_close(a.images, b.images)


def test_gpu_cache_steps_do_not_sync_the_host(index):
    dev = torch.device("cuda", torch.cuda.current_device())
    for train in (True, False):
        loader = make_loader("gpu_cache", index, cfg(rot90=True), Shard(0, 1), dev, train, 0)
        it = loader.iter_epoch(0)
        next(it)  # the epoch's one plan upload happens before the first batch
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in it:
                pass
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_gpu_cache_under_deterministic_algorithms(index):
    """train.deterministic turns on torch.use_deterministic_algorithms: the fused crop (gather and
    matrix products) must still run, and give the same batches twice."""
    dev = torch.device("cuda", torch.cuda.current_device())
    loader = make_loader("gpu_cache", index, cfg(), Shard(0, 1), dev, True, 0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        a = [b.images for b in loader.iter_epoch(0)]
        b = [b.images for b in loader.iter_epoch(0)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_synthetic_epochs_do_not_sync_the_host(index):
    """The epoch's plan goes to the device from pinned memory: an epoch start waits for nothing."""
    dev = torch.device("cuda", torch.cuda.current_device())
    for train in (True, False):
        loader = make_loader("synthetic", index, cfg(), Shard(0, 1), dev, train, 0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
        try:
            n = sum(1 for epoch in range(2) for _ in loader.iter_epoch(epoch))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert n == 2 * loader.steps_per_epoch
