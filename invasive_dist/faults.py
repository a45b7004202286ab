"""Fault injection for the fault-tolerance tests: ``INVASIVE_DIST_FAULT="kind@step[:rank],..."``.

    nan@5        the loss of global step 5 becomes NaN (all ranks; ``nan@5:1`` on rank 1 only)
    kill@7:0     rank 0 SIGKILLs itself after step 7 (no chance to save)
    save_crash@4 the process dies in the middle of writing the checkpoint of step 4
    hang@3:1     rank 1 stops responding at step 3 (exercises dist.timeout_s)

Steps are 1-based optimizer steps (``global_step`` after the step). Faults fire on the first attempt
only (not after a torchrun restart or a Slurm requeue). Unset in normal use: reading one environment
variable once is the whole cost.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "INVASIVE_DIST_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def parse(text: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, rest = part.partition("@")
        step, _, rank = rest.partition(":")
        if kind not in ("nan", "kill", "save_crash", "hang") or not step.isdigit():
            raise ValueError(f"{ENV}: cannot parse {part!r} (expected kind@step[:rank])")
        faults.append(Fault(kind, int(step), int(rank) if rank else None))
    return faults


class Faults:
    def __init__(self, rank: int, attempt: int = 0) -> None:
        self.rank = rank
        # Faults fire on the first attempt only: a worker restarted by torchrun (or a job requeued
        # by Slurm) resumes before the fault's step and must get past it.
        faults = parse(os.environ.get(ENV, "")) if attempt == 0 else []
        self.faults = [f for f in faults if f.rank in (None, rank)]

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _at(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step for f in self.faults)

    def loss_factor(self, step: int) -> float:
        return float("nan") if self._at("nan", step) else 1.0

    def after_step(self, step: int) -> None:
        if self._at("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._at("hang", step):
            while True:
                time.sleep(3600)

    def save_crash(self, step: int) -> bool:
        return self._at("save_crash", step)
