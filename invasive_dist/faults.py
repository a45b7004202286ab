"""Fault injection for the fault-tolerance tests: ``INVASIVE_DIST_FAULT="kind@step[:rank],..."``.

    nan@5          the loss of global step 5 becomes NaN (all ranks; ``nan@5:1`` on rank 1 only)
    kill@7:0       rank 0 SIGKILLs itself after step 7 (no chance to save)
    save_crash@4   the process dies in the middle of writing the checkpoint of step 4
    hang@3:1       rank 1 stops responding after step 3, before the next collective (the bound on
                   collectives, ``dist.timeout_s``, ends the job)
    data_hang@5:1  a training DataLoader worker of rank 1 sleeps forever when asked for its 5th sample (the
                   bound on the data wait ends the job); torch backend with ``data.torch.num_workers > 0``

Steps are 1-based optimizer steps (``global_step`` after the step). Faults fire on the first attempt
only (not after a torchrun restart or a Slurm requeue). The trainer holds one :class:`Faults` object;
without the variable it is :data:`NO_FAULTS`, whose hooks do nothing, and reading one environment
variable once is the whole cost. ``build_parts`` makes it and hands it to the Trainer and, through
the ``LoaderSpec``, to the torch backend's decoding workers (``data_item``); they only call the hooks,
and all fault code lives here.

``kill`` and ``hang`` could be caused from outside (SIGKILL, SIGSTOP), but at a moment read from the
logs: a tiny run takes seconds, so the signal would land at a different step on every machine. A
planted fault fires at a known step. SIGTERM/SIGUSR1, whose timing the code must cope with, are sent
by the tests themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

ENV = "INVASIVE_DIST_FAULT"
KINDS = ("nan", "kill", "save_crash", "hang", "data_hang")


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
        if kind not in KINDS or not step.isdigit():
            raise ValueError(f"{ENV}: cannot parse {part!r} (expected kind@step[:rank])")
        faults.append(Fault(kind, int(step), int(rank) if rank else None))
    return faults


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


class Faults:
    """The hooks the trainer calls. This base class is the no-op default."""

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of ``step`` as the trainer should use it."""
        return loss

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step``."""

    def saving(self, step: int) -> contextlib.AbstractContextManager:
        """Wraps the write of the checkpoint of ``step``."""
        return contextlib.nullcontext()

    def data_item(self) -> None:
        """Called by a DataLoader worker before each sample it loads (a worker knows no optimizer
        step: ``data_hang`` counts samples, per worker)."""


NO_FAULTS = Faults()


class PlantedFaults(Faults):
    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        hang = [f.step for f in faults if f.kind == "data_hang"]
        self._hang_at = min(hang) if hang else 0
        self._items = 0  # samples this copy has loaded: each worker gets its own copy

    def _at(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step for f in self.faults)

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if self._at("nan", step) else loss

    def after_step(self, step: int) -> None:
        if self._at("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._at("hang", step):
            _sleep_forever()

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[None]:
        if not self._at("save_crash", step):
            yield
            return
        # Let the checkpointer write as usual (its temp name, its file handle), then cut the file
        # in half and die before the rename: the process ends here, so the patched torch.save
        # never outlives the fault.
        real_save = torch.save

        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.flush()
            f.truncate(f.tell() // 2)
            os._exit(13)

        torch.save = dying_save
        yield

    def data_item(self) -> None:
        if self._hang_at:
            self._items += 1
            if self._items >= self._hang_at:
                _sleep_forever()


def from_env(rank: int, attempt: int = 0) -> Faults:
    """This rank's faults from ``INVASIVE_DIST_FAULT``; :data:`NO_FAULTS` when it is unset.
    ``attempt``: restarts so far (``WorldInfo.restart_count + slurm_restart_count``)."""
    # Faults fire on the first attempt only: a worker restarted by torchrun (or a job requeued
    # by Slurm) resumes before the fault's step and must get past it.
    faults = parse(os.environ.get(ENV, "")) if attempt == 0 else []
    mine = [f for f in faults if f.rank in (None, rank)]
    return PlantedFaults(mine) if mine else NO_FAULTS
