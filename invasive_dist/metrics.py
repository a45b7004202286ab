"""Metrics: ROC AUC, the run's metric writers (rank 0) and throughput accounting.

``MetricsWriter`` writes the same tags to ``metrics.jsonl`` (one JSON object per line with ``step``
and ``epoch``) and to TensorBoard event files under ``tb/``. Only the main process creates one.

``StepTimer`` measures, per log interval, the host time spent waiting for the next batch versus the
interval's wall time, without synchronising the device on every step: the device is synchronised
once per interval (when the interval's metrics are read), so the interval's wall time includes all
the queued work and ``data_wait_frac`` is the fraction of it the loop spent starved of input.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import write_text


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic, ties counted as half. NaN if one class is absent.

    Non-finite scores are refused (UserError): NaN has no rank, and ranking it anyway gives a
    number that looks like a result (all-NaN scores of 4 images gave 0.75)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        raise UserError(
            f"ROC AUC of non-finite scores: {int(bad.sum())} of {len(scores)} are NaN or infinite "
            f"(the first at position {int(np.flatnonzero(bad)[0])}); the predictions are not usable: "
            "check the model (a diverged run, an fp16 overflow) or the prediction file"
        )
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, from (0, 0) at threshold +inf down to
    (1, 1); a sample is called positive when its score is >= the threshold."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(
            f"a ROC curve needs both classes; these predictions have {n_pos} positive, {n_neg} negative"
        )
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises TPR - FPR (the highest such threshold on ties)."""
    fpr, tpr, thr = roc_curve(labels, scores)
    j = tpr[1:] - fpr[1:]
    return float(thr[1:][int(np.argmax(j))])


def confusion(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    return {
        "tn": int((~y & ~pred).sum()),
        "fp": int((~y & pred).sum()),
        "fn": int((y & ~pred).sum()),
        "tp": int((y & pred).sum()),
    }


PREVIOUS_ATTEMPT = "previous-attempt"  # where a fresh start puts what an earlier attempt logged


def set_aside_attempt(run_dir: Path) -> Path | None:
    """Move ``metrics.jsonl`` and ``tb/`` of an attempt that never saved a checkpoint to
    ``run_dir/previous-attempt/`` (replacing an older one there); the folder, or None if there was
    nothing to move."""
    run_dir = Path(run_dir)
    moving = [p for p in (run_dir / "metrics.jsonl", run_dir / "tb") if p.exists()]
    if not moving:
        return None
    aside = run_dir / PREVIOUS_ATTEMPT
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    for p in moving:
        os.replace(p, aside / p.name)
    return aside


class MetricsWriter:
    """JSONL + TensorBoard writer for the main process."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        """``resume_step``: the run resumed from a checkpoint of that step; rows logged after it
        (by the interrupted attempt) are dropped, since those steps are trained again. None: a run
        that starts at step 0; what an earlier attempt of it logged before it died without a
        checkpoint is moved to ``previous-attempt/`` (:attr:`set_aside`), so the files start fresh."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.set_aside = set_aside_attempt(run_dir) if resume_step is None else None
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            # Here, not at the top: only the writer that logs to TensorBoard (rank 0) loads the
            # tensorboard package and its protobufs (~50 ms after torch, measured on a 2-core CPU).
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge)

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        row = {"step": int(step), "epoch": int(epoch)}
        row.update({k: float(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), global_step=int(step))

    def flush(self) -> None:
        self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def max_memory_bytes(device: torch.device) -> int:
    """Device memory peak on GPU, peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class StepTimer:
    """Per-interval wall time and host time blocked on input; no device sync per step."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # seconds; tests pass a fake one
        self.reset()

    def reset(self) -> None:
        self.t0 = self.clock()
        self.data_wait = 0.0
        self.steps = 0
        self.samples = 0

    def data_start(self) -> None:
        self._d0 = self.clock()

    def data_end(self) -> None:
        self.data_wait += self.clock() - self._d0

    def step_done(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    def read(self, world_size: int) -> dict[str, float]:
        """Call after the interval's one device sync; returns perf/* metrics and resets."""
        wall = max(self.clock() - self.t0, 1e-9)
        per_device = self.samples / wall
        out = {
            "perf/data_wait_frac": self.data_wait / wall,
            "perf/step_time_s": wall / max(self.steps, 1),
            "perf/img_per_s_per_device": per_device,
            # Ranks step in lockstep (DDP all-reduce), so the global rate is per-device x world.
            "perf/img_per_s": per_device * world_size,
            "perf/world_size": float(world_size),
        }
        self.reset()
        return out
