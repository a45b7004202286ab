"""The DALI backend streams a whole run from one pipeline per loader, in the torch backend's order.

CPU-only DALI (``device_id=None``); tests/gpu/test_gpu_dali.py runs the ``mixed`` pipeline on CUDA.
Measured here (DALI 2.4.0 CPU, torchvision 0.29.1): each DALI training image against torchvision
applied to the same drawn box, flips and turns (rot90 on), per-image mean |diff| in normalized
units: mean 0.0044, max 0.0063 (tiny synthetic set, 32 px); 0.0021 and 0.0024 (real 1154x866 files,
224 px). What differs is rounding in the resize and at the edges of DALI's region-of-interest
decoding; a wrong flip or quarter turn changes a tiny-set image by 0.28 at the least (median 0.53).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from invasive_dist import distributed
from invasive_dist.config import DataConfig, config_from_dict
from invasive_dist.data import ImageSpec
from invasive_dist.data.base import IMAGENET_MEAN, IMAGENET_STD, Shard, eval_plan, sample_seeds, train_plan
from invasive_dist.data.dali import DaliConfig
from invasive_dist.data.kaggle import DataIndex, train_index
from invasive_dist.data.torch_backend import TorchConfig, decode_rgb, random_resized_crop_params
from invasive_dist.errors import UserError

dali = pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import")
from invasive_dist.data import dali as dali_backend  # noqa: E402
from invasive_dist.data.dali import augment_params  # noqa: E402

from ..loaders import make_loader  # noqa: E402

N = 50  # with batch 8 no world size divides it: training wraps, evaluation ends in short batches
BATCH = 8
CPU = torch.device("cpu")
TRAIN_VS_TORCH_IMAGE_MEAN_TOL = 0.02  # measured at most 0.0063 (module docstring)


def cfg(**kw) -> DataConfig:
    # num_workers only matters to the torch backend; one DALI thread: the machine has 2 cores.
    return DataConfig(
        image_size=32, batch_size=BATCH, torch=TorchConfig(num_workers=0), dali=DaliConfig(threads=1), **kw
    )


@pytest.fixture(scope="module")
def index(tiny_data) -> DataIndex:
    return train_index(tiny_data, limit=N)


def indices(batches) -> list[np.ndarray]:
    return [b.index.numpy() for b in batches]


def test_three_epochs_with_evaluation_build_each_pipeline_once(index):
    """What the training loop does: 3 epochs, an evaluation after each. One build per loader, every
    batch decoded once, the look-ahead crossing into the next epoch, nothing past the last."""
    train = make_loader("dali", index, cfg(), Shard(0, 1), CPU, True, 0, epochs=3)
    val = make_loader("dali", index, cfg(), Shard(0, 1), CPU, False, 0)
    steps, prefetch = train.steps_per_epoch, train.settings.prefetch
    assert steps == 7 and val.steps_per_epoch == 4 and prefetch == 2  # ceil(50 / 8), ceil(50 / 16)
    for epoch in range(3):
        got = indices(train.iter_epoch(epoch))
        np.testing.assert_array_equal(np.stack(got), train_plan(N, BATCH, Shard(0, 1), 0, epoch))
        # The queue already holds the next epoch's first batches, decoded during the evaluation.
        ahead = prefetch if epoch < 2 else 0
        assert train.decoded == (epoch + 1) * steps + ahead
        evaluated = indices(val.iter_epoch(0))
        assert [len(b) for b in evaluated] == [16, 16, 16, 2]
        np.testing.assert_array_equal(np.concatenate(evaluated), np.arange(N))
        assert val.decoded == (epoch + 1) * val.steps_per_epoch  # an evaluation of n batches decodes n
    assert (train.builds, val.builds) == (1, 1)
    assert (train.wasted, val.wasted) == (0, 0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_every_epoch_in_the_torch_plan(index, world):
    """Per rank, one streaming loader over 3 epochs yields the torch backend's plan: the same batches
    of indices, every sample at least once per epoch across ranks, equal step counts."""
    loaders = [make_loader("dali", index, cfg(), Shard(r, world), CPU, True, 0) for r in range(world)]
    torch_ref = [make_loader("torch", index, cfg(), Shard(r, world), CPU, True, 0) for r in range(world)]
    assert {ld.steps_per_epoch for ld in loaders} == {-(-N // (BATCH * world))}
    orders = []
    for epoch in range(3):
        seen = []
        for ld, ref in zip(loaders, torch_ref):
            got = indices(ld.iter_epoch(epoch))
            want = [b.index.numpy() for b in ref.iter_epoch(epoch)]
            assert len(got) == len(want) == ld.steps_per_epoch
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
            seen.append(np.concatenate(got))
        seen = np.concatenate(seen)
        np.testing.assert_array_equal(np.unique(seen), np.arange(N))
        assert len(seen) == loaders[0].steps_per_epoch * BATCH * world
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert all(ld.builds == 1 for ld in loaders)
    # Evaluation: contiguous shards, the last batch short; all ranks together cover the split.
    for r in range(world):
        ld = make_loader("dali", index, cfg(), Shard(r, world), CPU, False, 0)
        for g, w in zip(indices(ld.iter_epoch(0)), eval_plan(N, 2 * BATCH, Shard(r, world))):
            np.testing.assert_array_equal(g, w)


def test_shuffle_repeats_by_seed_and_differs_by_seed(index):
    def order(seed: int) -> np.ndarray:
        ld = make_loader("dali", index, cfg(), Shard(1, 2), CPU, True, seed)
        return np.concatenate(indices(ld.iter_epoch(0)))

    np.testing.assert_array_equal(order(0), order(0))
    assert not np.array_equal(order(0), order(1))


def test_resume_mid_epoch_gives_the_same_batches_and_decodes_no_skipped_one(index):
    d = cfg(rot90=True)
    full = make_loader("dali", index, d, Shard(1, 2), CPU, True, 0, epochs=2)
    run = [list(full.iter_epoch(e)) for e in range(2)]
    k = 2
    resumed = make_loader("dali", index, d, Shard(1, 2), CPU, True, 0, epochs=2)
    tail = list(resumed.iter_epoch(1, start_step=k))
    assert resumed.decoded == resumed.steps_per_epoch - k  # the k skipped batches were never decoded
    assert len(tail) == len(run[1]) - k
    for a, b in zip(run[1][k:], tail):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)  # same augmentations: a pure function of the slot


def test_crops_follow_torchvisions_law(monkeypatch):
    """The vectorized draw: boxes inside the image with torchvision's area and aspect bounds (or the
    center square), fair coins and quarter turns, the same law as the torch backend's draws."""
    seeds = sample_seeds(0, 0, 0, np.arange(4000))
    d = ImageSpec.from_config(DataConfig())  # scale_min 0.35
    sizes = np.tile([[866, 1154]], (4000, 1))
    p = augment_params(sizes, seeds, d)
    again = augment_params(sizes, seeds, d)
    assert all(np.array_equal(getattr(p, f), getattr(again, f)) for f in ("top", "left", "hflip"))
    h, w = sizes[:, 0], sizes[:, 1]
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= h).all() and (p.left + p.width <= w).all()
    area, aspect = p.width * p.height / (h * w), p.width / p.height
    assert area.min() >= 0.35 - 0.01 and area.max() <= 1 and aspect.min() > 0.74 and aspect.max() < 1.34
    rng = np.random.default_rng(0)
    ref = np.array([random_resized_crop_params(866, 1154, 0.35, rng) for _ in range(4000)], dtype=float)
    ref_area = ref[:, 2] * ref[:, 3] / (866 * 1154)
    assert abs(area.mean() - ref_area.mean()) < 0.01, (area.mean(), ref_area.mean())
    assert abs(p.hflip.mean() - 0.5) < 0.03 and abs(p.vflip.mean() - 0.5) < 0.03
    np.testing.assert_allclose(np.bincount(p.quarter_turns, minlength=4) / 4000, 0.25, atol=0.03)
    # A strip no 0.35-area crop of aspect <= 4/3 fits into: the center square, as torchvision.
    strip = augment_params(np.array([[20, 400]]), seeds[:1], d)
    assert (strip.height[0], strip.width[0], strip.top[0], strip.left[0]) == (20, 20, 0, 190)


def test_training_images_are_the_drawn_crops_flips_and_turns(index, tmp_path):
    """Each DALI training image is its drawn box, resized, flipped and turned as torchvision does it
    with the same parameters (measured per-image mean |diff| in the module docstring), also for a
    photo with an EXIF rotation (the box is in upright pixels, as the header read gives them)."""
    from PIL import Image

    (tmp_path / "train").mkdir()
    rows = []
    for i in range(BATCH):
        img = Image.open(index.paths[i])
        exif = img.getexif()
        if i == 0:
            exif[0x0112] = 6  # stored sideways: upright it is 72 wide and 96 tall
        img.save(tmp_path / "train" / f"{i + 1}.jpg", quality=95, exif=exif)
        rows.append(f"{i + 1},{index.labels[i]}")
    (tmp_path / "train_labels.csv").write_text("name,invasive\n" + "\n".join(rows) + "\n")
    sub = train_index(tmp_path)
    d = cfg(rot90=True)
    ld = make_loader("dali", sub, d, Shard(0, 1), CPU, True, 0)
    assert tuple(ld.sizes[sub.names.index("1")]) == (96, 72)
    batch = next(iter(ld.iter_epoch(1)))  # all 8 images
    params = ld.train_params((1, 0), batch.index.numpy())
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    (left, top), (width, height) = params["anchor"].T, params["shape"].T
    for i, pos in enumerate(batch.index.tolist()):
        img = decode_rgb(sub.paths[pos])
        img = TF.resized_crop(
            img, int(top[i]), int(left[i]), int(height[i]), int(width[i]), [32, 32], antialias=True
        )
        if params["hflip"][i]:
            img = img.flip(-1)
        if params["vflip"][i]:
            img = img.flip(-2)
        img = torch.rot90(img, int(params["angle"][i]) // 90, dims=(-2, -1))
        ref = (img.float() / 255 - mean) / std
        diff = (ref - batch.images[i]).abs().mean()
        assert diff < TRAIN_VS_TORCH_IMAGE_MEAN_TOL, (i, diff)


def test_a_batch_out_of_order_restarts_the_queue(index):
    """An epoch left early (or any jump): the queued batches are taken out unused, the answer is
    still the plan's batch, and the pipeline is not rebuilt."""
    ld = make_loader("dali", index, cfg(), Shard(0, 1), CPU, True, 0)
    it = ld.iter_epoch(0)
    next(it)  # schedules steps 0, 1, 2
    del it
    got = indices(ld.iter_epoch(3, start_step=4))
    np.testing.assert_array_equal(np.stack(got), train_plan(N, BATCH, Shard(0, 1), 0, 3)[4:])
    assert ld.wasted == 2 and ld.builds == 1
    assert list(ld.iter_epoch(3, start_step=ld.steps_per_epoch)) == []


def test_images_are_handed_over_without_a_copy(index):
    """The batch's storage is DALI's output buffer (DLPack), not a torch allocation; in channels_last
    it is the pipeline's NHWC batch viewed as NCHW."""
    for channels_last in (False, True):
        ld = make_loader("dali", index, cfg(), Shard(0, 1), CPU, True, 0, channels_last=channels_last)
        pipe_out = []
        take = ld._take

        def spy(key, stream, take=take, pipe_out=pipe_out):
            out, item = take(key, stream)
            pipe_out.append(out.as_tensor())
            return out, item

        ld._take = spy
        b = next(iter(ld.iter_epoch(0)))
        assert b.images.data_ptr() == pipe_out[0].data_ptr()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert b.images.is_contiguous(memory_format=fmt)


def test_settings_follow_the_machine(index, monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "CGROUP_ROOT", tmp_path)  # no CPU quota, whatever this machine has
    monkeypatch.setattr(dali_backend.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(dali_backend.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert dali_backend.cores_per_process() == 2  # 16 cores shared by 8 processes
    monkeypatch.setattr(dali_backend.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert dali_backend.cores_per_process() == 3  # already bound to 3 cores: that is its share
    # 2 cores x 300 img/s Huffman >= 10 % of 4,000 img/s: CPU; 35 % of it is 1,400 img/s: GPU.
    assert dali_backend.auto_huffman_threshold(2, 0.9) == 1_000_000
    assert dali_backend.auto_huffman_threshold(2, 0.65) == 0
    sizes = np.array([[866, 1154], [1154, 866], [72, 96]])
    s = dali_backend.resolve_settings(DaliConfig(hw_decoder_load=0.65), sizes)
    assert (s.threads, s.hybrid_huffman_threshold, s.width_hint, s.height_hint) == (3, 0, 1154, 1154)
    s = dali_backend.resolve_settings(DaliConfig(threads=5, hybrid_huffman_threshold=7), sizes)
    assert (s.threads, s.hybrid_huffman_threshold) == (5, 7)
    ld = make_loader("dali", index, cfg(), Shard(0, 1), CPU, True, 0)
    assert (ld.settings.width_hint, ld.settings.height_hint) == (96, 72)  # the tiny set's size
    with pytest.raises(UserError, match="data.dali.prefetch"):
        config_from_dict({"data": {"dali": {"prefetch": -1}}})
