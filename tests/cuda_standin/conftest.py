"""Fixtures of the CUDA stand-in lane (``standin.py``): the stand-in itself, and the project's real
Trainer built on it from the shipped ResNet-50 benchmark config."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from invasive_dist import build as build_mod
from invasive_dist import train as train_mod
from invasive_dist.config import load_config
from invasive_dist.data.base import Batch
from invasive_dist.data.transforms import image_hw
from invasive_dist.distributed import WorldInfo

from .standin import CudaStandin, cuda_standin, unsupported

BENCH = Path(__file__).resolve().parents[2] / "configs" / "bench_r50.yaml"


@pytest.fixture
def standin():
    reason = unsupported()
    if reason:
        pytest.skip(reason)
    with cuda_standin() as s:
        yield s


def build_trainer(s: CudaStandin, cfg) -> train_mod.Trainer:
    """The Trainer as ``train`` builds it (``build_parts``: data check, model on the device in its
    memory format, param groups, fused optimizer, EMA), without loaders: the steps are fed batches
    already on the device, as ``bench``'s model mode feeds them."""
    acc = s.accelerator(cfg.train.mixed_precision)
    with mock.patch.object(build_mod, "build_model", s.real(build_mod.build_model)):
        parts = train_mod.build_parts(cfg, acc, WorldInfo(), train_loader=False, val_loader=False)
    return train_mod.Trainer(cfg, acc, WorldInfo(), parts)


def config(tiny_data, tmp_path, *overrides: str):
    """configs/bench_r50.yaml (ResNet-50, batch 256, 224 px, bf16, channels_last, fused SGD) on the
    tiny data set, with ``overrides``; compile stays off (Inductor does not run on fake tensors)."""
    return load_config(BENCH, [f"data.root={tiny_data}", f"output.root={tmp_path}", *overrides])


def device_batches(s: CudaStandin, trainer: train_mod.Trainer, b: int = 0):
    """``next_batch`` for ``train_step``: batches of ``b`` (default: the per-device batch) as every
    backend delivers them (float32 images in the model's memory format, float32 labels, int64
    indices, all on the device)."""
    b = b or trainer.plan.per_device
    h, w = image_hw(trainer.cfg.data.image_size)
    fmt = torch.channels_last if trainer.channels_last else torch.contiguous_format
    made: list[Batch] = []

    def next_batch() -> Batch:
        batch = Batch(
            torch.empty((b, 3, h, w), device=s.device, memory_format=fmt),
            torch.empty(b, device=s.device),
            torch.empty(b, dtype=torch.int64, device=s.device),
        )
        made.append(batch)
        return batch

    next_batch.made = made
    return next_batch
