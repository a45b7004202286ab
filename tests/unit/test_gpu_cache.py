"""gpu_cache's build and fused augmentation on CPU tensors (the code path CUDA runs, without CUDA).

The fused crop is held against the torch backend's own operations: ``TF.resized_crop`` with
antialias on the same box, then its flips and ``torch.rot90`` in its order; the boxes against
``torch_backend.random_resized_crop_params`` by their distribution (the random streams differ).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from invasive_dist.config import DataConfig, load_config
from invasive_dist.data import gpu_cache
from invasive_dist.data.base import IMAGENET_MEAN, IMAGENET_STD, Shard
from invasive_dist.data.gpu_cache import DRAWS, TRIES, GpuCacheConfig, crop_plan, fused_crop, uniforms
from invasive_dist.data.kaggle import DataIndex, train_index
from invasive_dist.data.torch_backend import TorchConfig, decode_rgb, random_resized_crop_params
from invasive_dist.errors import UserError

from ..loaders import make_loader

CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
H, W = 379, 505  # the stored size of the 1154x866 Kaggle images at 224 px


def cfg(**kw) -> DataConfig:
    # num_workers=0: the gpu_cache backend has no DataLoader; the torch reference runs in-process.
    return DataConfig(image_size=32, batch_size=8, torch=TorchConfig(num_workers=0), **kw)


@pytest.fixture(scope="module")
def index(tiny_data) -> DataIndex:
    return train_index(tiny_data, limit=48)


def test_fused_crop_is_resized_crop_then_flips_and_rot90():
    """Per sample: the torch backend's train_transform on the same box and draws, normalized."""
    size = 24
    g = torch.Generator().manual_seed(0)
    cache = torch.randint(0, 256, (5, 3, 60, 80), generator=g, dtype=torch.uint8)
    seeds = np.arange(1, 97, dtype=np.uint64) * np.uint64(0x9E3779B1)
    plan = crop_plan(seeds, 60, 80, 0.35, hflip=True, vflip=True, rot90=True)
    rows = torch.arange(len(seeds)) % 5
    out = fused_crop(
        cache, rows, torch.from_numpy(plan.packed()), size, 1 / (255 * STD.view(3)), -MEAN / STD, True, True
    )
    assert out.shape == (96, 3, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    r = uniforms(seeds, DRAWS)[:, 2 * TRIES :]
    ks = np.floor(r[:, 4] * 4).astype(int)
    assert set(ks) == {0, 1, 2, 3} and plan.transpose.any() and not plan.transpose.all()
    for i in range(len(seeds)):
        box = int(plan.top[i]), int(plan.left[i]), int(plan.height[i]), int(plan.width[i])
        ref = TF.resized_crop(cache[rows[i]].float(), *box, [size, size], antialias=True)
        if r[i, 2] < 0.5:
            ref = ref.flip(-1)
        if r[i, 3] < 0.5:
            ref = ref.flip(-2)
        ref = torch.rot90(ref, int(ks[i]), dims=(-2, -1))
        torch.testing.assert_close(out[i], ((ref / 255 - MEAN) / STD)[0], atol=1e-4, rtol=0)


def test_normalization_of_a_flat_image_is_exact():
    cache = torch.empty(2, 3, 40, 50, dtype=torch.uint8)
    cache[:, 0], cache[:, 1], cache[:, 2] = 10, 128, 250
    plan = crop_plan(np.arange(16, dtype=np.uint64), 40, 50, 0.1, True, True, True)
    out = fused_crop(
        cache,
        torch.arange(16) % 2,
        torch.from_numpy(plan.packed()),
        16,
        1 / (255 * STD.view(3)),
        -MEAN / STD,
        False,
        True,
    )
    want = (torch.tensor([10, 128, 250]).view(1, 3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(out, want.expand_as(out), atol=1e-5, rtol=0)


def test_crop_geometry_is_in_bounds_and_distributed_as_the_torch_backend():
    n, scale_min = 20000, 0.35
    plan = crop_plan(np.arange(n, dtype=np.uint64) * np.uint64(7919), H, W, scale_min, True, True, False)
    top, left, ch, cw = plan.top, plan.left, plan.height, plan.width
    assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= H).all() and (left + cw <= W).all()
    rng = np.random.default_rng(0)
    ref = np.array([random_resized_crop_params(H, W, scale_min, rng) for _ in range(n)])
    for name, got, want in [
        ("area", ch * cw / (H * W), ref[:, 2] * ref[:, 3] / (H * W)),
        ("log aspect", np.log(cw / ch), np.log(ref[:, 3] / ref[:, 2])),
        ("center y", (top + ch / 2) / H, (ref[:, 0] + ref[:, 2] / 2) / H),
        ("center x", (left + cw / 2) / W, (ref[:, 1] + ref[:, 3] / 2) / W),
    ]:
        # Means of 20,000 draws: the standard error is under 0.3 % of each range.
        assert abs(got.mean() - want.mean()) < 0.01, (name, got.mean(), want.mean())
        assert abs(got.std() - want.std()) < 0.01, (name, got.std(), want.std())
    area = ch * cw / (H * W)
    assert area.min() >= scale_min - 0.01 and area.max() <= 1.0
    assert np.abs(np.log(cw / ch)).max() <= math.log(4 / 3) + 0.02
    assert not plan.transpose.any()  # rot90 off


def test_flips_and_rotations_have_the_right_frequencies():
    n = 20000
    seeds = np.arange(n, dtype=np.uint64)
    off = crop_plan(seeds, H, W, 0.35, False, False, False)
    assert not (off.flip_h.any() or off.flip_w.any() or off.transpose.any())
    on = crop_plan(seeds, H, W, 0.35, True, True, False)
    for flips in (on.flip_h, on.flip_w):
        assert abs(flips.mean() - 0.5) < 0.02  # 4 standard errors of a fair coin over 20,000
    assert abs((on.flip_h & on.flip_w).mean() - 0.25) < 0.02  # independent
    rot = crop_plan(seeds, H, W, 0.35, False, False, True)
    assert abs(rot.transpose.mean() - 0.5) < 0.02  # k = 1 or 3
    # The boxes do not depend on which flips are on.
    assert (on.top == off.top).all() and (rot.width == off.width).all()


def test_every_sample_once_per_epoch_and_resume_is_exact(index):
    d = cfg(rot90=True)  # 48 images, 2 ranks x batch 8: three steps per epoch, no padding
    seen = []
    for rank in range(2):
        loader = make_loader("gpu_cache", index, d, Shard(rank, 2), CPU, True, 0)
        full = list(loader.iter_epoch(3))
        assert len(full) == loader.steps_per_epoch == 3
        seen += [b.index for b in full]
        tail = list(
            make_loader("gpu_cache", index, d, Shard(rank, 2), CPU, True, 0).iter_epoch(3, start_step=2)
        )
        assert len(tail) == 1
        assert torch.equal(tail[0].index, full[2].index) and torch.equal(tail[0].images, full[2].images)
    assert sorted(torch.cat(seen).tolist()) == list(range(48))
    other = next(iter(loader.iter_epoch(4)))
    assert not torch.equal(other.images, full[0].images)  # another epoch, other crops


def test_cache_built_in_chunks_equals_one_image_at_a_time(index, monkeypatch):
    """The chunked build (read-ahead, decoding in the pool, one resize per chunk) stores what
    decoding and resizing each file alone gives; 48 files in chunks of 5 end in a short chunk."""
    monkeypatch.setattr(gpu_cache, "CUDA_DECODE_CHUNK", 5)
    loader = make_loader("gpu_cache", index, cfg(), Shard(), CPU, True, 0)
    want = torch.stack([loader._fit(decode_rgb(p)) for p in index.paths])
    assert torch.equal(loader.images, want)


def test_build_reports_time_bytes_and_progress(index, capsys, monkeypatch):
    monkeypatch.setenv("INVASIVE_DIST_PROGRESS_S", "0")  # a progress line at every chunk, however fast
    loader = make_loader("gpu_cache", index, cfg(), Shard(0, 2), CPU, True, 0)
    info = loader.build_info
    assert info["cache_images"] == 48 and info["cache_bytes"] == 48 * 3 * 55 * 73
    assert info["cache_build_s"] > 0
    err = capsys.readouterr().err
    assert "[gpu_cache decode] 48/48 img" in err and "img/s" in err  # stderr is not a TTY here
    assert "built in" in err and "GiB on this rank" in err
    make_loader("gpu_cache", index, cfg(), Shard(1, 2), CPU, False, 0)  # not the main process: silent
    assert capsys.readouterr().err == ""


def test_train_statistics_agree_with_the_torch_backend_on_real_files(real_sample):
    """Real 1154x866 JPEGs at 224 px: per-channel mean and std of two augmented epochs."""
    idx = train_index(real_sample)
    d = DataConfig(image_size=224, batch_size=4, torch=TorchConfig(num_workers=2))

    def stats(loader):
        x = torch.cat([b.images for e in (0, 1) for b in loader.iter_epoch(e)])
        return x.mean((0, 2, 3)), x.std((0, 2, 3))

    got = stats(make_loader("gpu_cache", idx, d, Shard(), CPU, True, 0))
    ref = stats(make_loader("torch", idx, d, Shard(), CPU, True, 0))
    # Different crops of 10 photos: measured differences 0.050 (means) and 0.043 (stds) here.
    torch.testing.assert_close(got[0], ref[0], atol=0.1, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0.1, rtol=0)


def test_dali_decoder_builds_the_same_cache(index, capsys):
    """data.gpu_cache.decoder=dali on a CPU: DALI's CPU decoder (device_id=None) in the code that
    decodes with DALI's ``mixed`` one on CUDA (tests/gpu runs that). Both decoders are libjpeg-turbo
    here, so the caches are equal; the default on a CPU stays torchvision."""
    pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import")
    for train in (True, False):
        ref = make_loader("gpu_cache", index, cfg(), Shard(), CPU, train, 0)
        got = make_loader(
            "gpu_cache", index, cfg(gpu_cache=GpuCacheConfig(decoder="dali")), Shard(), CPU, train, 0
        )
        assert ref.build_info["cache_decoder"] == "torchvision cpu"
        assert got.build_info["cache_decoder"] == "dali cpu"
        assert torch.equal(got.images, ref.images)
    assert "(dali cpu)" in capsys.readouterr().err  # the build's line names its decoder


def test_dali_decoder_names_a_file_it_cannot_decode(index, tmp_path):
    """One broken JPEG fails DALI's whole batch (its message names no file): the files are then
    decoded one by one on the CPU, and the error names the broken one."""
    pytest.importorskip("nvidia.dali", reason="nvidia.dali does not import")
    broken = tmp_path / "broken.jpg"
    whole = index.paths[3].read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])  # headers intact (so sent to DALI), data cut short
    assert not gpu_cache._needs_cpu_decode(broken, broken.read_bytes())
    paths = list(index.paths)
    paths[3] = broken
    bad = dataclasses.replace(index, paths=paths)
    with pytest.raises(UserError, match="broken.jpg"):
        make_loader("gpu_cache", bad, cfg(gpu_cache=GpuCacheConfig(decoder="dali")), Shard(), CPU, True, 0)


def test_decoder_setting_is_checked():
    with pytest.raises(
        UserError, match="data.gpu_cache.decoder='nvjpeg' must be one of auto, dali, torchvision"
    ):
        load_config(None, ["data.gpu_cache.decoder=nvjpeg"])


def test_torchvision_deprecation_warning_is_filtered_by_the_package(index):
    """torchvision 0.29 warns at every decode; the package filters it once, so even a run that turns
    DeprecationWarnings into errors decodes (the torch backend's decode_rgb and gpu_cache's build)."""
    code = (
        "import sys, torch; from pathlib import Path; from invasive_dist.data.transforms import decode_rgb; "
        "from invasive_dist.data.gpu_cache import _decode_or_none; p = Path(sys.argv[1]); decode_rgb(p); "
        "assert _decode_or_none(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)) is not None"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning:torchvision.io.image",
            "-c",
            code,
            str(index.paths[0]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
