"""A torch.profiler window over a few training steps, written as a Chrome/Perfetto trace per rank.

    with ProfilerWindow(cfg.profile, run_dir / "profile", rank) as prof:
        for step ...:
            with record_function("data"): ...
            prof.step()

``profile.wait`` steps are skipped, ``profile.warmup`` are recorded and discarded, ``profile.active``
are kept and written to ``profile/rank<R>.<pid>.pt.trace.json``. Open it at https://ui.perfetto.dev
(drag the file in) or in chrome://tracing. Ranks not in ``profile.ranks`` do nothing.
"""

from __future__ import annotations

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

    def __enter__(self) -> ProfilerWindow:
        if self.enabled:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(
                activities=activities,
                schedule=schedule(
                    wait=self.cfg.wait, warmup=self.cfg.warmup, active=self.cfg.active, repeat=1
                ),
                on_trace_ready=self._on_trace_ready,
                record_shapes=False,
                with_stack=False,
            )
            self._prof.__enter__()
        return self

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None
