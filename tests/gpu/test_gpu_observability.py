"""The observability promises of tests/unit/test_observability.py on a CUDA device, where a host
read really is a device sync: the training step makes none (``torch.cuda.set_sync_debug_mode``), and
the profiler trace holds GPU kernels next to the named ranges. Skipped without CUDA; run by
tests/gpu_check.sh (``pytest -m gpu tests/gpu``)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from invasive_dist import train as train_mod
from invasive_dist.bench import batch_pool
from invasive_dist.cli import main
from invasive_dist.config import load_config
from invasive_dist.distributed import WorldInfo, build_accelerator

from ..conftest import FAST_TRAIN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="plain"),
        pytest.param(["train.mixup_alpha=0.2"], id="mixup"),  # the permutation is copied to the device
        pytest.param(["train.cutmix_alpha=1.0"], id="cutmix"),
    ],
)
def test_cuda_train_step_does_not_sync(tiny_data, tmp_path, fresh_accelerate_state, extra):
    cfg = load_config(
        None,
        [
            *FAST_TRAIN,
            f"data.root={tiny_data}",
            f"output.root={tmp_path}",
            "train.mixed_precision=bf16",
            "model.channels_last=true",
            *extra,
        ],
    )
    world = WorldInfo()
    acc = build_accelerator(cfg, world)
    trainer = train_mod.Trainer(cfg, acc, world, train_mod.build_parts(cfg, acc, world))
    assert trainer.device.type == "cuda" and trainer.channels_last
    batches = itertools.cycle(batch_pool(2, 8, 64, trainer.device, channels_last=True))
    for _ in range(3):  # library handles, the allocator's first blocks, the optimizer state
        trainer.train_step(lambda: next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for _ in range(5):
            loss, gnorm, bad = trainer.train_step(lambda: next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.is_cuda and gnorm.is_cuda and bad.is_cuda and bad.item() == 0


def test_cuda_trace_has_kernels_and_ranges(tiny_data, tmp_path, fresh_accelerate_state):
    argv = [
        "train",
        *FAST_TRAIN,
        f"data.root={tiny_data}",
        f"output.root={tmp_path}",
        "output.name=gpu",
        "train.epochs=1",
        "train.mixed_precision=bf16",
        "profile.enabled=true",
        "profile.wait=1",
        "profile.warmup=1",
        "profile.active=2",
    ]
    assert main(argv) == 0
    (trace,) = (tmp_path / "gpu" / "profile").glob("rank0.*.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert {"data", "forward", "backward", "optimizer"} <= {e.get("name") for e in events}
    assert any(e.get("cat") == "kernel" for e in events), "no GPU kernels in the trace"
