"""Sharding and order, for every backend: what a distributed run relies on.

World sizes 1-3 are simulated in one process (one loader per rank). The split has 50 images, so with
batch 8 the global batch never divides it (train pads by wrapping) and with eval batch 16 the per-rank
shards end in short batches (17 per rank for world 3).
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

N = 50
BATCH = 8
CPU = torch.device("cpu")

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")
BACKENDS = [
    "torch",
    pytest.param("dali", marks=needs_dali),
    "gpu_cache",
    "synthetic",
]


def make(backend: str, index: DataIndex, shard: Shard, train: bool, seed: int = 0, **cfg):
    """One rank's loader; loaders are pure functions of their arguments, so they are built once."""
    key = (backend, id(index), shard, train, seed, tuple(sorted(cfg.items())))
    if key not in _LOADERS:
        _LOADERS[key] = _build(backend, index, shard, train, seed, **cfg)
    return _LOADERS[key]


_LOADERS: dict = {}


def _build(backend: str, index: DataIndex, shard: Shard, train: bool, seed: int, **cfg):
    # num_workers=0: the plan, not the workers, decides the batches (test_watchdog checks 2 workers).
    d = DataConfig(
        image_size=32, batch_size=BATCH, torch=TorchConfig(num_workers=0), dali=DaliConfig(threads=1), **cfg
    )
    return make_loader(backend, index, d, shard, CPU, train, seed)


@pytest.fixture(scope="module")
def index(tiny_data) -> DataIndex:
    return train_index(tiny_data, limit=N)


def check_batch(batch, index: DataIndex, labels_from_csv: bool) -> np.ndarray:
    assert batch.index.dtype == torch.int64 and batch.labels.dtype == torch.float32
    pos = batch.index.numpy()
    assert ((pos >= 0) & (pos < len(index))).all()
    if labels_from_csv:
        np.testing.assert_array_equal(batch.labels.numpy(), index.labels[pos].astype(np.float32))
    return pos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_epoch_covers_the_split_with_equal_steps(index, backend, world):
    loaders = [make(backend, index, Shard(r, world), train=True) for r in range(world)]
    steps = {ld.steps_per_epoch for ld in loaders}
    assert steps == {-(-N // (BATCH * world))}, "every rank must take the same number of steps"
    seen = []
    for ld in loaders:
        batches = list(ld.iter_epoch(0))
        assert len(batches) == ld.steps_per_epoch
        for b in batches:
            assert b.images.shape == (BATCH, 3, 32, 32)
            seen.append(check_batch(b, index, labels_from_csv=backend != "synthetic"))
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.unique(seen), np.arange(N))  # every sample at least once
    assert len(seen) == steps.pop() * BATCH * world


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sees_every_sample_once_after_dedupe(index, backend, world):
    loaders = [make(backend, index, Shard(r, world), train=False) for r in range(world)]
    per_rank = -(-N // world)
    assert {ld.steps_per_epoch for ld in loaders} == {-(-per_rank // (2 * BATCH))}
    seen = []
    for ld in loaders:
        batches = list(ld.iter_epoch(0))
        assert len(batches) == ld.steps_per_epoch
        seen.append(
            np.concatenate([check_batch(b, index, labels_from_csv=backend != "synthetic") for b in batches])
        )
        assert len(seen[-1]) == per_rank  # the reader's last-batch padding is not passed on
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.unique(seen), np.arange(N))
    assert len(seen) - N < world  # only the padding to a multiple of world size repeats samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffle_is_seeded_per_epoch(index, backend):
    def order(epoch, seed=0):
        ld = make(backend, index, Shard(1, 2), train=True, seed=seed)
        return np.concatenate([b.index.numpy() for b in ld.iter_epoch(epoch)])

    first = order(0)
    assert not np.array_equal(first, order(1)), "epochs must be shuffled differently"
    np.testing.assert_array_equal(first, order(0))  # same seed, new loader: same order
    assert not np.array_equal(first, order(0, seed=1))


@needs_dali
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_dali_shards_are_the_torch_plan(index, train, world):
    """The DALI pipeline is fed the torch backend's per-rank plan batch by batch, so both backends
    yield the same indices in the same order on every rank."""
    for r in range(world):
        dali = make("dali", index, Shard(r, world), train)
        ref = make("torch", index, Shard(r, world), train)
        assert dali.steps_per_epoch == ref.steps_per_epoch
        got = [b.index.numpy() for b in dali.iter_epoch(3)]
        want = [b.index.numpy() for b in ref.iter_epoch(3)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_start_step_gives_the_tail_of_the_epoch(index, backend, train):
    ld = make(backend, index, Shard(0, 2), train=train, rot90=True)
    full = list(ld.iter_epoch(1))
    k = 1
    tail = list(ld.iter_epoch(1, start_step=k))
    assert len(tail) == ld.steps_per_epoch - k
    for a, b in zip(full[k:], tail):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        # torch and DALI seed augmentation per sample slot, gpu_cache per step: a resumed epoch
        # has the same augmentations without decoding the skipped steps.
        assert torch.equal(a.images, b.images)
    assert list(ld.iter_epoch(1, start_step=ld.steps_per_epoch)) == []
