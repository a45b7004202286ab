"""``invasive-dist bench`` on a CUDA device (tests/unit/test_bench.py runs it on CPU): the hardware
description names the GPU, the settings carry bf16 and channels-last, and no end-to-end figure beats
its ceilings by more than 25%. Skipped without CUDA. tests/gpu_check.sh leaves it out: its bench items
run the same code at full scale."""

from __future__ import annotations

import pytest
import torch

from ..unit.test_bench import _bench

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bench_cuda(tiny_data, tmp_path, fresh_accelerate_state, measured):
    rc, result = _bench(
        tiny_data,
        tmp_path,
        "synthetic",
        "torch",
        "gpu_cache",
        steps=10,
        warmup=3,
        extra=["train.mixed_precision=bf16", "model.channels_last=true"],
    )
    assert rc == 0, result
    hw, s = result["hardware"], result["settings"]
    assert hw["gpu"] and hw["gpu_memory_bytes"] > 0 and hw["cuda"]
    assert s["channels_last"] is True and s["mixed_precision"] == "bf16"
    for r in result["rows"]:
        # One 10-step window of a launch-bound ResNet-18 at 64 px: a bound not yet measured on a GPU.
        ratio = r["e2e_img_per_s"] / min(r["input_img_per_s"], r["model_img_per_s"])
        line = measured(f"{r['backend']} e2e / min(input, model)", ratio, "<= 1.25", ratio <= 1.25)
        assert ratio <= 1.25, line
