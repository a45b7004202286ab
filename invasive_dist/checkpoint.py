"""Checkpoints: atomic writes, rotation, resume.

    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=2)
    ckpt.save(state, step=1200, is_best=True)       # main process only
    state = ckpt.load("auto")                        # None when there is nothing to resume

Layout: ``step-00001200.pt`` (the newest ``keep_last`` are kept), ``last.pt`` (a hard link to the
newest step file), ``best.pt``. Every file (and link) is written to a temp name, fsynced, then
renamed (``files.atomic_write`` with ``durable=True``), so a crash in the middle of a write leaves the
previous checkpoint intact and a partial file is never picked up: temp files (``.<name>.<pid>.tmp``)
never match a checkpoint name, and the next save deletes them. Loading uses ``weights_only=True``:
the state may hold only tensors, containers and plain Python values.

One run per directory: a fresh run (``resume=''``) into a folder that already holds a run's
checkpoints, metrics or TensorBoard events refuses to start (:func:`refuse_mixed_run`) and offers
``resume=auto`` or a new ``output.name``, the way ``git clone`` refuses a non-empty folder; otherwise
the second run's steps 1..N would follow the first's in ``metrics.jsonl`` and ``tb/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from .errors import UserError
from .files import atomic_link, atomic_write, remove_stale_temps

_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:  # through a file object: faults.py's save_crash cuts this file
        torch.save(obj, f)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`files.atomic_write` with fsync (see the module docstring)."""
    atomic_write(path, lambda tmp: _torch_save(obj, tmp), durable=True)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UserError(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); it may be "
            "truncated or from another program; delete it to fall back to an older one"
        ) from None


def run_outputs(run_dir: Path) -> list[str]:
    """The files in ``run_dir`` that show a training run has written there (relative names)."""
    run_dir = Path(run_dir)
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in ckpt.iterdir() if p.suffix == ".pt")[:3]
    tb = run_dir / "tb"
    if tb.is_dir() and any(p.name.startswith("events.") for p in tb.iterdir()):
        found.append("tb/")
    return found


def _free_name(run_dir: Path) -> str:
    for k in range(2, 1000):
        candidate = run_dir.with_name(f"{run_dir.name}-{k}")
        if not candidate.exists():
            return candidate.name
    return f"{run_dir.name}-new"


def mixed_run_problem(run_dir: Path, resume: str) -> str:
    """'' when a run may start in ``run_dir`` with ``resume``, else what to do instead."""
    if resume:
        return ""  # continuing (auto) or starting from a named checkpoint: the user chose this folder
    found = run_outputs(run_dir)
    if not found:
        return ""
    return (
        f"{run_dir} already holds a run ({', '.join(found)}); a fresh run there would mix with it. "
        f"Continue that run with resume=auto, start a new one with output.name={_free_name(run_dir)}, "
        f"or delete {run_dir}"
    )


def refuse_mixed_run(run_dir: Path, resume: str, accelerator=None) -> None:
    """Raise UserError on every rank when the main process finds another run in ``run_dir``.

    The main process decides and broadcasts, so ranks agree even while it creates the run's files."""
    problem = [mixed_run_problem(run_dir, resume)]
    if accelerator is not None and accelerator.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0]:
        raise UserError(problem[0])


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int = 2) -> None:
        self.dir = Path(directory)
        self.keep_last = max(1, keep_last)

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def step_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        files = [p for p in self.dir.iterdir() if _STEP_RE.match(p.name)]
        return sorted(files, key=lambda p: int(_STEP_RE.match(p.name).group(1)))

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        path = self.dir / f"step-{step:08d}.pt"
        atomic_torch_save(state, path)
        atomic_link(path, self.last, durable=True)
        if is_best:
            atomic_link(path, self.best, durable=True)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        remove_stale_temps(self.dir)  # leftovers of a crash in an earlier write
        return path

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint that ``resume`` names: '' -> None, 'auto' -> last (if any), else a path."""
        if resume == "":
            return None
        if resume == "auto":
            if self.last.is_file():
                return self.last
            steps = self.step_files()
            return steps[-1] if steps else None
        return Path(resume)

    def load(self, resume: str) -> dict | None:
        path = self.resolve(resume)
        return None if path is None else load_checkpoint(path)
