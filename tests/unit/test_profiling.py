"""The profiler window on a machine without a GPU says nothing about GPUs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ..conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is about a machine without a GPU")
def test_cpu_profiler_window_prints_no_gpu_error(tmp_path):
    """Issue 24: with a CUDA build of torch and no GPU, the CPU profiler printed
    `gpuGetDeviceCount failed with code 35` (kineto, when the window closes). A fresh interpreter:
    kineto reads its log level when the first profiler starts."""
    code = textwrap.dedent(f"""
        import torch
        from invasive_dist.config import ProfileConfig
        from invasive_dist.profiling import ProfilerWindow

        with ProfilerWindow(ProfileConfig(enabled=True, wait=0, warmup=1, active=1), {str(tmp_path)!r}, 0) as p:
            for _ in range(3):
                torch.ones(8) @ torch.ones(8)
                p.step()
        assert p.trace_paths, "no trace written"
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gpuGetDeviceCount" not in r.stderr + r.stdout
    assert "[profile] rank 0: wrote" in r.stderr
