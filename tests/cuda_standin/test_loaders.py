"""The device-side batch paths of the loaders on the CUDA stand-in (``standin.py``): gpu_cache's
training batches (the fused crop in fp16 on the side stream) and evaluation batches, as a GPU run
iterates them, with host syncs treated as errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from invasive_dist.data import Shard, synthetic
from invasive_dist.data import gpu_cache as gc
from invasive_dist.data.base import LoaderSpec
from invasive_dist.data.kaggle import split

from .conftest import BENCH
from .standin import Event, HostSync, current_stream


def spec(cfg, index, device, train: bool) -> LoaderSpec:
    return LoaderSpec.of(index, cfg.data, Shard(), device, train, cfg.seed, channels_last=True)


def gpu_cache_loader(standin, cfg, index, train: bool) -> gc.GpuCacheLoader:
    """A gpu_cache loader on the device. Its cache is built by the real code except the decoding
    (nvJPEG cannot be stood in): ``_fill`` leaves the fake uint8 cache as allocated."""
    with mock.patch.object(gc.GpuCacheLoader, "_fill", lambda self, cache, paths, pool, progress: None):
        return gc.GpuCacheLoader(spec(cfg, index, standin.device, train), cfg.data.gpu_cache)


def assert_device_batch(standin, batch, n: int, hw: tuple[int, int]) -> None:
    assert (batch.images.device, batch.images.dtype) == (standin.device, torch.float32)
    assert batch.images.shape == (n, 3, *hw)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert (batch.labels.device, batch.labels.dtype, batch.labels.shape) == (
        standin.device,
        torch.float32,
        (n,),
    )
    assert (batch.index.device, batch.index.dtype, batch.index.shape) == (standin.device, torch.int64, (n,))


@pytest.mark.parametrize("size", ["224", "[600,800]"])
def test_gpu_cache_batches(standin, tiny_data, tmp_path, size):
    """Two training batches of 256 (the second made on the side stream while the first is used)
    and the evaluation batches, at 224 px and at [600, 800]."""
    from invasive_dist.build import checked_index
    from invasive_dist.config import load_config

    cfg = load_config(BENCH, [f"data.root={tiny_data}", f"output.root={tmp_path}", f"data.image_size={size}"])
    train_idx, val_idx = split(checked_index(cfg, _OneProcess()), cfg.data.n_folds, cfg.data.fold, cfg.seed)
    hw = (224, 224) if size == "224" else (600, 800)

    loader = gpu_cache_loader(standin, cfg, train_idx, train=True)
    assert loader.images.device == standin.device and loader.images.dtype == torch.uint8
    with standin.hot_loop("gpu_cache training batches"):
        it = loader.iter_epoch(0)
        first = next(it)
        second = next(it, None)
    assert_device_batch(standin, first, 256, hw)
    assert second is None or second.images.shape == first.images.shape
    # The crops ran as fp16 matrix products on the device, and the main stream waited for the side
    # stream's event before the batch was handed out.
    assert standin.checks.seen[("aten.bmm", torch.float16)] > 0
    assert any(isinstance(w, Event) and w.stream is loader._side for w in current_stream().waits)

    loader = gpu_cache_loader(standin, cfg, val_idx, train=False)
    with standin.hot_loop("gpu_cache evaluation batches"):
        batches = list(loader.iter_epoch(0))
    assert len(batches) == loader.steps_per_epoch
    for b, plan in zip(batches, loader.plan):
        assert_device_batch(standin, b, len(plan), hw)


@pytest.mark.xfail(
    raises=HostSync,
    strict=True,
    reason="issue 22 section 3: the synthetic backend copies each epoch's plan to the device from "
    "pageable memory, blocking (remove this mark when it pins and copies with non_blocking)",
)
def test_synthetic_epoch_start(standin, tiny_data, tmp_path):
    from invasive_dist.build import checked_index
    from invasive_dist.config import load_config

    cfg = load_config(BENCH, [f"data.root={tiny_data}", f"output.root={tmp_path}", "data.backend=synthetic"])
    train_idx, _ = split(checked_index(cfg, _OneProcess()), cfg.data.n_folds, cfg.data.fold, cfg.seed)
    loader = synthetic.SyntheticLoader(spec(cfg, train_idx, standin.device, True))
    with standin.hot_loop("synthetic training batches"):
        batch = next(iter(loader.iter_epoch(0)))
    assert_device_batch(standin, batch, 256, (224, 224))


class _OneProcess:
    """What ``build.checked_index`` needs of an Accelerator in one process."""

    is_main_process = True

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()
