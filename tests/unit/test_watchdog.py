"""No hang by construction: persistent DataLoader workers that end on signals, and the watchdog that
bounds the trainer's waits (invasive_dist/watchdog.py). The multi-process versions, under torchrun,
are in tests/integration/test_faults.py and test_hang.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from invasive_dist.config import DataConfig
from invasive_dist.data.base import Shard
from invasive_dist.data.kaggle import train_index
from invasive_dist.data.torch_backend import TorchConfig, TorchLoader

from ..conftest import ROOT
from ..loaders import make_loader


def _loader(tiny_data, workers: int, rank: int = 1) -> TorchLoader:
    # workers: the demo's 2 unless 0
    d = DataConfig(image_size=32, batch_size=8, torch=TorchConfig(num_workers=workers))
    index = train_index(tiny_data, d.labels_csv, 0)
    return make_loader("torch", index, d, Shard(rank, 2), torch.device("cpu"), True, seed=3)


def _epoch(loader: TorchLoader, epoch: int, start: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b.images.numpy(), b.index.numpy()) for b in loader.iter_epoch(epoch, start_step=start)]


def test_persistent_workers_give_the_batches_of_no_workers_and_start_once(tiny_data):
    """2 epochs, a resume mid-epoch and an epoch left unfinished: the same batches as in the main
    process, from the same two worker processes throughout."""
    ref, par = _loader(tiny_data, 0), _loader(tiny_data, 2)
    try:
        got0 = _epoch(par, 0)
        pids = sorted(w.pid for w in par.loader._iterator._workers)
        partial = par.iter_epoch(1)
        next(partial)  # left unfinished, as a stop mid-epoch leaves it
        got = [got0, _epoch(par, 1), _epoch(par, 1, start=2)]
        want = [_epoch(ref, 0), _epoch(ref, 1), _epoch(ref, 1, start=2)]
        for g, w in zip(got, want):
            assert len(g) == len(w) > 0
            for (gi, gx), (wi, wx) in zip(g, w):
                np.testing.assert_array_equal(gx, wx)
                np.testing.assert_array_equal(gi, wi)
        assert sorted(w.pid for w in par.loader._iterator._workers) == pids, "workers were restarted"
    finally:
        par.close()


def test_a_worker_serves_its_rank_through_a_sigterm_then_ends_by_itself(tiny_data, monkeypatch):
    """The trainer turns SIGTERM into a flag; its workers must not inherit that and live on, nor die
    at once (Slurm and torchrun signal them together with the trainer, which still needs a batch or
    two to reach its step boundary): a worker keeps serving for the grace, then ends by itself."""
    from invasive_dist.data import torch_backend

    # 25 s in use. What must happen within the grace here: the epoch's last 2 batches and a whole
    # next epoch (4 batches, asked for after the signal) arrive. Measured 0.002 s and 0.03 s after
    # the signal, also with 6 busy processes on the 2 cores: 12 s leaves a stalled CI machine 400x
    # that; the test waits the whole grace (the workers' end is bounded from below by it).
    grace = 12
    monkeypatch.setattr(torch_backend, "WORKER_SIGNAL_GRACE_S", grace)
    caught = []
    old = signal.signal(signal.SIGTERM, lambda *a: caught.append(1))
    loader = _loader(tiny_data, 2)
    try:
        it = loader.iter_epoch(0)
        got = [next(it), next(it)]  # one batch from each worker: both are past their start-up
        workers = list(loader.loader._iterator._workers)
        t0 = time.monotonic()
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
        rest = list(it)  # the epoch's remaining batches still arrive
        assert len(got) + len(rest) == loader.steps_per_epoch
        # They were in flight before the signal (prefetch 4 per worker); the next epoch's batches
        # are asked for after it: the workers still serve.
        assert len(list(loader.iter_epoch(1))) == loader.steps_per_epoch
        served = time.monotonic() - t0
        assert all(w.is_alive() for w in workers), f"a worker died within {served:.1f} s of the signal"
        for w in workers:
            w.join(timeout=grace + 60)  # generous: the end is checked from below, not timed
            assert w.exitcode == -signal.SIGALRM, f"worker exit code {w.exitcode}"
        assert time.monotonic() - t0 >= grace - 0.5, "a worker ended before its grace"
        assert caught == []
    finally:
        signal.signal(signal.SIGTERM, old)
        loader.close()


def _child(body: str) -> subprocess.Popen:
    code = "from invasive_dist.watchdog import Watchdog\nimport signal, sys, time\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_wait_past_its_bound_ends_the_process_with_rank_wait_and_stack():
    p = _child(
        """
        w = Watchdog(rank=3, timeout_s=1.0)
        def stuck_here():
            with w.waiting("data (a training batch)"):
                time.sleep(60)
        stuck_here()
        """
    )
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1, out
    assert "error: rank 3 waited 1 s for data (a training batch)" in out, out
    assert "in stuck_here" in out.split("Python stacks follow")[1], out


@pytest.mark.parametrize("in_wait", [True, False])
def test_sigterm_while_blocked_in_a_wait_ends_after_the_grace(in_wait):
    """Blocked in a bounded wait: out after the grace (exit 143), long before the wait's own bound.
    Not in a wait (computing a step): the signal is left to the trainer's step boundary."""
    p = _child(
        f"""
        signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's handler: only sets a flag
        w = Watchdog(rank=0, timeout_s=120, signal_grace_s=1.0)
        print("ready", flush=True)
        if {in_wait}:
            with w.waiting("a collective (test)"):
                time.sleep(60)
        else:
            time.sleep(6)
            print("left to the step boundary", flush=True)
        """
    )
    assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    if in_wait:
        assert p.returncode == 143, out
        assert "error: rank 0 waited" in out and "SIGTERM arrived" in out, out
        assert elapsed < 10, elapsed
    else:
        assert p.returncode == 0 and "left to the step boundary" in out, out


def test_stop_flag_destroys_its_gloo_group_on_close(tmp_path):
    """Issue 20: cv makes one StopFlag per fold and pseudo-label round in one process; each made a
    gloo group that was never destroyed, so they piled up. Closing one destroys its group."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from invasive_dist.watchdog import StopFlag, Watchdog

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    # One process stands in for the ranks: StopFlag makes its group whenever world_size > 1.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        groups = len(c10d._world.pg_map)
        for _fold in range(3):
            stop = StopFlag(2, 30, Watchdog(0, 30))
            assert len(c10d._world.pg_map) == groups + 1
            assert stop.agreed() is False  # the group works while open
            group = stop.group
            stop.close()
            assert len(c10d._world.pg_map) == groups and group not in c10d._world.pg_map
    finally:
        dist.destroy_process_group()
