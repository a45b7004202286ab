"""The README's multi-process command, as users run it, on a busy machine: it always finishes.

Before the DataLoader workers were persistent and started by a forkserver, a worker forked at the
first evaluation, in a process that already had threads (gloo, TensorBoard, OpenMP), deadlocked in
the fork about 1 run in 6 with two busy-loop processes beside the job (issue 10). This test runs
the README's torchrun command (2 processes, ``configs/demo.yaml`` as shipped: torch backend, 2
DataLoader workers, TensorBoard on) for 2 epochs, evaluation included, several times back to back
while two busy-loop processes keep the CPU loaded, each run under a timeout. Only ``data.root``,
``train.epochs`` and the output folder differ from the README; the tiny data set keeps each run to
tens of seconds (1 step per epoch, batch 32 per process).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from invasive_dist.checkpoint import load_checkpoint

from ..conftest import ROOT
from ..procs import clean_env, kill_tree

TORCHRUN = Path(sys.executable).with_name("torchrun")
RUNS = 3
RUN_TIMEOUT = 300  # s per run; a hung run (the defect) never ends, a healthy one takes ~30-60 s here


@pytest.fixture
def busy_cpu():
    """Two busy-loop processes (the load under which the fork deadlock showed up)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_readme_torchrun_command_finishes_every_time_on_a_busy_cpu(busy_cpu, tiny_data, tmp_path):
    times = []
    for i in range(RUNS):
        name = f"run{i}"
        cmd = [
            str(TORCHRUN),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "invasive_dist",
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.root={tiny_data}",
            "train.epochs=2",
            f"output.root={tmp_path}",
            f"output.name={name}",
        ]
        log_path = tmp_path / f"{name}.log"
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = proc.wait(RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
                pytest.fail(
                    f"run {i + 1} of {RUNS} still running after {RUN_TIMEOUT} s (earlier runs: {times}):\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}"
                )
        times.append(round(time.monotonic() - t0, 1))
        out = log_path.read_text(errors="replace")
        assert rc == 0, f"run {i + 1}: exit code {rc}\n{out[-4000:]}"
        assert "epoch 2/2: val/auc" in out, out[-4000:]  # both evaluations ran
        state = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
        assert state["epoch"] == 2
    print(f"{RUNS} loaded runs of the README command finished in {times} s")
