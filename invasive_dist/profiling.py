"""A torch.profiler window over a few training steps, written as a Chrome/Perfetto trace per rank.

    with ProfilerWindow(cfg.profile, run_dir / "profile", rank) as prof:
        for step ...:
            with record_function("data"): ...
            prof.step()

Of the training steps, ``profile.wait`` are skipped (compilation, cuDNN autotuning and DataLoader
start-up happen there), ``profile.warmup`` are recorded and discarded (the profiler's own start-up),
``profile.active`` are kept and written, once, to ``profile/rank<R>.step<N>.pt.trace.json`` (N: the
profiler's step count when the window closed). Only the ranks in ``profile.ranks`` record; the
others pay nothing. A run that ends inside the window still writes what it recorded.

The trace holds the host side (Python ops, the ``data``/``forward``/``backward``/``optimizer``
ranges of ``Trainer.train_step``, one ``ProfilerStep#k`` range per step) and, on CUDA, the kernels
and copies on the GPU's streams. Open it at https://ui.perfetto.dev (Open trace file) or
chrome://tracing; summarise a folder of them with HolisticTraceAnalysis (see docs/observability.md).
Exporting takes a few seconds on a GPU: the interval that contains it shows a lower img/s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule


class ProfilerWindow:
    def __init__(self, cfg_profile, out_dir: Path, rank: int) -> None:
        self.enabled = bool(cfg_profile.enabled) and rank in cfg_profile.ranks
        self.cfg, self.out_dir, self.rank = cfg_profile, Path(out_dir), rank
        self._prof = None
        self.trace_paths: list[Path] = []

    def _on_trace_ready(self, prof) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank}.step{prof.step_num}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        self.trace_paths.append(path)
        print(
            f"[profile] rank {self.rank}: wrote {path} (open it at https://ui.perfetto.dev)", file=sys.stderr
        )

    def __enter__(self) -> ProfilerWindow:
        if self.enabled:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            else:
                # A CUDA build of torch on a machine without a GPU: kineto asks the driver for the
                # device count when the window closes, whatever the activities, and logs
                # "ERROR: ... DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35"
                # (cudaErrorInsufficientDriver). Its log level is read when a profiler starts; 5 hides
                # its ERROR lines, which here can only be about the missing GPU. A level the user set wins.
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            self._prof = profile(
                activities=activities,
                schedule=schedule(
                    wait=self.cfg.wait, warmup=self.cfg.warmup, active=self.cfg.active, repeat=1
                ),
                on_trace_ready=self._on_trace_ready,
                # Shapes and Python stacks make the trace several times larger and the window
                # slower; the named ranges and kernels answer "where does a step's time go".
                record_shapes=False,
                with_stack=False,
            )
            self._prof.__enter__()
        return self

    def step(self) -> None:
        """Call once per optimizer step (after it was queued)."""
        if self._prof is not None:
            self._prof.step()

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None
