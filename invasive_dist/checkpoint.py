"""Checkpoints: atomic writes, rotation, resume.

    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=2)
    ckpt.save(state, step=1200, is_best=True)       # main process only
    path, state = ckpt.load_resume("auto")           # (None, None) when there is nothing to resume

Layout: ``step-00001200.pt`` (the newest ``keep_last`` are kept), ``last.pt`` (a hard link to the
newest step file), ``best.pt`` and ``best_weights.pt`` (only the chosen weights of the best model,
EMA when kept, with the config that rebuilds it: ``model.weights=`` and ``predict`` read it; a
ResNet-18's is 45 MB where a step file with AdamW and EMA is 180 MB). Every file (and link) is
written to a temp name, fsynced, then renamed (``files.atomic_write`` with ``durable=True``), so a
crash in the middle of a write leaves the previous checkpoint intact and a partial file is never
picked up: temp files (``.<name>.<pid>.tmp``) never match a checkpoint name, and the next save
deletes them. Loading uses ``weights_only=True``:
the state may hold only tensors, containers and plain Python values.

Resume (``resume=auto``, and every torchrun restart or Slurm requeue): ``last.pt``, then the step
files newest first; a file that does not load (truncated by a full disk, cut short by a copy) is
skipped with a warning naming it and why, and the newest intact one is continued from.

One run per directory: a fresh run (``resume=''``) into a folder that already holds a run's
checkpoints, metrics or TensorBoard events refuses to start (:func:`refuse_mixed_run`) and offers
a new ``output.name`` (and ``resume=auto`` when there is a checkpoint to continue), the way ``git
clone`` refuses a non-empty folder; otherwise the second run's steps 1..N would follow the first's
in ``metrics.jsonl`` and ``tb/``. A continued run (``resume=auto`` or a path) into a folder whose
``config.yaml`` differs from its settings in a key that changes what is trained
(``config.resume_differences``) is refused too, naming the keys.

Fencing: the main process of every attempt claims the folder (:meth:`Checkpointer.claim` writes
``checkpoints/OWNER``: a fresh token, host, pid, time), and every checkpoint file is renamed into
place only while that file still holds its token. A process that was frozen (a stopped host, a
suspended VM) and thaws after another attempt took over therefore never replaces that attempt's
``last.pt``: it stops with :class:`FencedOut`, naming the attempt that owns the folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from .config import Config, resume_differences, yaml_load
from .errors import UserError
from .files import atomic_link, atomic_write, remove_stale_temps

_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:  # through a file object: faults.py's save_crash cuts this file
        torch.save(obj, f)


def atomic_torch_save(obj: Any, path: Path, fence=None) -> None:
    """``torch.save`` through :func:`files.atomic_write` with fsync (see the module docstring)."""
    atomic_write(path, lambda tmp: _torch_save(obj, tmp), durable=True, fence=fence)


@contextlib.contextmanager
def _ctrl_c_after_the_write():
    """Ctrl-C during a save takes effect when the save is done: a KeyboardInterrupt inside
    ``torch.save`` leaves its zip writer broken (``unexpected pos``), a traceback and no file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(signal.SIGINT, pending[0])
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


class FencedOut(RuntimeError):
    """This process's attempt no longer owns the run folder: another attempt claimed it."""


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def load_checkpoint(path: Path, hint: str = "") -> dict:
    """The state in ``path``; a UserError naming the file (and ``hint``, what to do) if it does not load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UserError(
            f"checkpoint {path} cannot be loaded ({_first_line(e)}); it may be truncated (a full "
            f"disk, a copy cut short) or from another program{'; ' + hint if hint else ''}"
        ) from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def _has_checkpoint(run_dir: Path) -> bool:
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    return ckpt.last.is_file() or bool(ckpt.step_files())


def mixed_run_problem(run_dir: Path, resume: str, cfg: Config | None = None) -> str:
    """'' when a run may start in ``run_dir`` with ``resume`` (and settings ``cfg``), else what to
    do instead."""
    run_dir = Path(run_dir)
    found = run_outputs(run_dir)
    if not found:
        return ""
    new_name = f"output.name={_free_name(run_dir)}"
    if not resume:
        if _has_checkpoint(run_dir):
            todo = f"Continue that run with resume=auto, start a new one with {new_name}"
        else:  # nothing to continue: resume=auto would only start it again
            todo = f"It has no checkpoint to continue. Start a new run with {new_name}"
        return (
            f"{run_dir} already holds a run ({', '.join(found)}); a fresh run there would mix with it. "
            f"{todo}, or delete {run_dir}"
        )
    if cfg is None:
        return ""
    saved = run_dir / "config.yaml"
    try:
        raw = yaml_load(saved.read_text()) if saved.is_file() else None
    except Exception:  # unreadable: the checkpoint's own checks (model keys, global batch) remain
        raw = {}
    if raw is None:
        if _has_checkpoint(run_dir):
            return ""  # a folder from before config.yaml was written first: the checkpoint decides
        return (
            f"{run_dir} holds files of a run ({', '.join(found)}) but no config.yaml and no checkpoint: "
            f"nothing to continue, and no way to tell whose they are. Start a new run with {new_name}, "
            f"or delete {run_dir}"
        )
    diffs = resume_differences(raw if isinstance(raw, dict) else {}, cfg)
    if not diffs:
        return ""
    if _has_checkpoint(run_dir):
        return (
            f"{saved} does not match this run's settings: {', '.join(diffs)}. A continued run keeps the "
            f"settings it was trained with: continue it with those of {saved}, or start a new run with "
            f"{new_name} (model.weights={run_dir}/checkpoints/last.pt starts it from that run's weights)"
        )
    return (
        f"{run_dir} holds another run's files ({', '.join(found)}; no checkpoint to continue): its "
        f"config.yaml does not match this run's settings: {', '.join(diffs)}. Start this run with "
        f"{new_name}, or delete {run_dir}"
    )


def refuse_mixed_run(run_dir: Path, resume: str, accelerator=None, cfg: Config | None = None) -> None:
    """Raise UserError on every rank when the main process finds another run in ``run_dir`` (or,
    with ``cfg``, a run with other settings).

    The main process decides and broadcasts, so ranks agree even while it creates the run's files."""
    is_main = accelerator is None or accelerator.is_main_process
    problem = [mixed_run_problem(run_dir, resume, cfg) if is_main else ""]
    if accelerator is not None and accelerator.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0]:
        raise UserError(problem[0])


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int = 2) -> None:
        self.dir = Path(directory)
        self.keep_last = max(1, keep_last)
        self.token = ""  # set by claim(): saves are then fenced on it

    @property
    def owner_file(self) -> Path:
        return self.dir / "OWNER"

    def claim(self) -> None:
        """Make this attempt the folder's owner (main process, before its first save)."""
        self.token = uuid.uuid4().hex
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        atomic_write(
            self.owner_file,
            lambda tmp: tmp.write_text(
                f"{self.token} {socket.gethostname()} pid {os.getpid()} since {stamp}\n"
            ),
            durable=True,
        )

    def _fence(self) -> None:
        if not self.token:
            return
        try:
            owner = self.owner_file.read_text().strip()
        except OSError:
            owner = ""
        if owner.split(" ", 1)[0] != self.token:
            who = owner.split(" ", 1)[1] if " " in owner else "nobody (the file is gone)"
            raise FencedOut(
                f"{self.dir} now belongs to another attempt ({who}): this process was stopped or cut off "
                "while that attempt took over the run, so it ends without writing a checkpoint"
            )

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    @property
    def best_weights(self) -> Path:
        return self.dir / "best_weights.pt"

    def step_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        files = [p for p in self.dir.iterdir() if _STEP_RE.match(p.name)]
        return sorted(files, key=lambda p: int(_STEP_RE.match(p.name).group(1)))

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        path = self.dir / f"step-{step:08d}.pt"
        with _ctrl_c_after_the_write():
            atomic_torch_save(state, path, fence=self._fence)
            atomic_link(path, self.last, durable=True, fence=self._fence)
            if is_best:
                atomic_link(path, self.best, durable=True, fence=self._fence)
                atomic_torch_save(weights_only(state), self.best_weights, fence=self._fence)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        remove_stale_temps(self.dir)  # leftovers of a crash in an earlier write
        return path

    def newest(self) -> tuple[Path, int] | None:
        """(``last.pt`` or the newest step file, its step) by name, without loading; None if none."""
        steps = self.step_files()
        if not steps:
            return None
        step = int(_STEP_RE.match(steps[-1].name).group(1))
        return (self.last if _same_file(self.last, steps[-1]) else steps[-1]), step

    def candidates(self) -> list[tuple[Path, str]]:
        """What ``resume=auto`` tries, in order: ``last.pt``, then the step files newest first; each
        file once (``last.pt`` is a hard link to the newest step file). Pairs (path, its name in a
        message)."""
        steps = self.step_files()[::-1]
        out: list[tuple[Path, str]] = []
        if self.last.is_file():
            alias = next((p for p in steps if _same_file(self.last, p)), None)
            out.append((self.last, f"{self.last} (= {alias.name})" if alias else str(self.last)))
            steps = [p for p in steps if p != alias]
        return out + [(p, str(p)) for p in steps]

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint that ``resume`` names: '' -> None, 'auto' -> last (if any), else a path."""
        if resume == "":
            return None
        if resume == "auto":
            found = self.candidates()
            return found[0][0] if found else None
        return Path(resume)

    def load_resume(self, resume: str, quiet: bool = False) -> tuple[Path | None, dict | None]:
        """(path, state) to continue from, or (None, None). ``resume=auto`` skips a checkpoint that
        does not load and takes the newest intact one, saying on stderr (unless ``quiet``: the
        other ranks) what it skipped and why; a UserError when none loads."""
        warn = None if quiet else _warn
        if resume == "":
            return None, None
        if resume != "auto":
            hint = "resume=auto instead continues from the newest intact checkpoint of the run folder"
            return Path(resume), load_checkpoint(Path(resume), hint)
        skipped: list[str] = []
        for path, name in self.candidates():
            try:
                state = load_checkpoint(path)
            except UserError as e:
                reason = str(e).split(" cannot be loaded ", 1)[-1].split("; it may be", 1)[0]
                skipped.append(f"{name} {reason}")
                if warn:
                    warn(f"[checkpoint] skipping {name}: it cannot be loaded {reason}; trying an older one")
                continue
            if skipped and warn:
                warn(f"[checkpoint] continuing from {path}, the newest intact checkpoint")
            return path, state
        if skipped:
            raise UserError(
                f"no checkpoint in {self.dir} can be loaded: {'; '.join(skipped)}. Continue from a copy "
                "(resume=PATH), or start a new run (output.name=<new name>)"
            )
        return None, None

    def load(self, resume: str) -> dict | None:
        return self.load_resume(resume)[1]


def weights_only(state: dict) -> dict:
    """The part of a training state that rebuilds the model: the weights that validated better
    (``eval_weights``: raw or EMA; older checkpoints: the EMA when kept), the config, and where they
    came from. ``model.weights=`` and ``predict`` read it."""
    which = state.get("eval_weights") or ("ema" if state.get("ema") else "model")
    keys = ("config", "epoch", "global_step", "best_auc")
    return {"model": state[which], "weights": which} | {k: state[k] for k in keys if k in state}
