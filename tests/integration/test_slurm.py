"""slurm/train.sbatch on a real single-node Slurm (munged, slurmctld, slurmd on this machine).

The module starts the cluster with tests/slurm/start.sh (idempotent: it installs Debian's
slurmctld/slurmd/slurm-client/munge when missing and starts the daemons). Without root, and with no
cluster already running, the tests skip; as root (CI) a cluster that cannot start is a failure.

- A short run in CPU mode (``sbatch --gpus-per-node=0``: the node has no GPUs, a GPU request would
  pend forever) with ``sbatch --wait``: the exit code alone proves little (a drained node can still
  report COMPLETED), so the test reads what the job wrote: the log (world, rendezvous, epochs),
  metrics.jsonl, the checkpoints.
- Preemption, both ways a job is stopped: SIGUSR1 to the batch shell (what ``--signal=B:USR1@120``
  sends before the time limit; the script's trap makes the training save, then requeues the job)
  and ``scontrol requeue`` from outside (Slurm sends SIGTERM to every step; the training saves, Slurm
  requeues). After each, the job runs again with SLURM_RESTART_COUNT=1, 2, resumes from the step it
  saved, and finishes; metrics.jsonl holds every training step exactly once.

Speed: the cluster uses cred_expire=10 and sched_interval=2 (a requeued job restarts after about
15 s, not about 170 s) and MinJobAge=16 (``sbatch --wait`` polls every 8 s). About 3.5 min on 2 CPU
cores: the short run about 45 s, the preempted one about 150 s (three starts of torchrun).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from invasive_dist.metrics import read_metrics

from ..conftest import ROOT
from ..procs import clean_env

pytestmark = pytest.mark.slow

SBATCH = ROOT / "slurm" / "train.sbatch"
JOB_TIMEOUT = 420  # s for any one wait; generous: the machine may be shared

# 2 processes x 4 images = global batch 8: 48 training images (fold 0 of 4 held out) -> 6 steps/epoch.
SETTINGS = [
    "model.arch=resnet18",
    "data.image_size=32",
    "data.batch_size=4",
    "data.n_folds=4",
    "train.log_every=1",
    "optim.name=adamw",
    "optim.lr=0.002",
    "output.tensorboard=false",
]
STEPS_PER_EPOCH = 6


def _run(*cmd, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def slurm() -> None:
    """A running single-node Slurm, started by tests/slurm/start.sh when needed."""
    if _run("bash", ROOT / "tests" / "slurm" / "cluster.sh", "status").returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not running and starting it needs root (tests/slurm/start.sh)")
    have_slurm = all(shutil.which(c) for c in ("sbatch", "slurmctld", "slurmd", "munged")) or all(
        Path(p).exists() for p in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")
    )
    if not have_slurm and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    p = _run("bash", ROOT / "tests" / "slurm" / "start.sh", timeout=900)
    if p.returncode != 0:
        pytest.fail(
            f"tests/slurm/start.sh failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )


def job_env() -> dict:
    """What sbatch exports into the job: this environment without Slurm/launcher variables."""
    return clean_env()


def sbatch(
    tmp: Path, name: str, *overrides: str, wait: bool
) -> tuple[subprocess.CompletedProcess, str, Path]:
    """Submit train.sbatch in CPU mode from the repository root; returns (result, job id, log)."""
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"output": {"root": str(tmp)}}))
    log = tmp / f"{name}.out"
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--gpus-per-node=0", f"--output={log}"]
    if wait:
        cmd.append("--wait")
    cmd += [SBATCH, config, *SETTINGS, f"output.name={name}", *overrides]
    p = _run(*cmd, cwd=ROOT, env=job_env(), timeout=JOB_TIMEOUT + 60)
    job = p.stdout.strip().split(";")[0].splitlines()[0] if p.stdout.strip() else ""
    return p, job, log


def job_state(job: str) -> str:
    p = _run("scontrol", "show", "job", job)
    m = re.search(r"JobState=(\w+)", p.stdout)
    return m.group(1) if m else "GONE"


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until(pred, what: str, job: str, log: Path, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        state = job_state(job)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            pytest.fail(f"job {job} is {state} while waiting for {what}:\n{text(log)[-5000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} ({state}): no {what} after {timeout:.0f} s:\n{text(log)[-5000:]}")
        time.sleep(0.5)


@pytest.fixture
def cancel_on_exit():
    """Jobs to scancel when the test ends, so that a failed test leaves nothing running."""
    jobs: list[str] = []
    yield jobs
    for j in jobs:
        _run("scancel", j)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


# ------------------------------------------------------------------------------------------------
def test_sbatch_cpu_mode_trains_and_writes_its_outputs(slurm, tiny_data, tmp_path, cancel_on_exit):
    name = "short"
    p, job, log = sbatch(tmp_path, name, f"data.root={tiny_data}", "train.epochs=1", wait=True)
    cancel_on_exit.append(job)
    out = text(log)
    assert p.returncode == 0, f"sbatch --wait exit {p.returncode}: {p.stderr}\n{out[-5000:]}"
    assert re.fullmatch(r"\d+", job), p.stdout
    # The log: the job, the world the script set up, the training, the end.
    assert f"job {job} ({name}) SLURM_RESTART_COUNT=0" in out, out[-5000:]
    assert "1 node(s) x 2 process(es), CPU mode (no GPUs allocated), gloo" in out, out[-5000:]
    assert re.search(
        rf"\+ srun --nodes=1 --ntasks-per-node=1 torchrun --nnodes=1 --nproc_per_node=2 "
        rf"--rdzv_backend=c10d --rdzv_endpoint=\S+:\d+ --rdzv_id={job} -m invasive_dist train --config \S+ resume=auto",
        out,
    ), out[:3000]
    assert "global batch 8 = 4 per device x 2 processes x 1 accumulation" in out, out[-5000:]
    assert re.search(r"epoch 1/1: val/auc [\d.]+ val/loss [\d.]+ \(n=16\)", out), out[-5000:]
    assert "srun step (torchrun) ended with exit code 0" in out
    # What the training wrote.
    run_dir = tmp_path / name
    assert train_steps(run_dir) == list(range(1, STEPS_PER_EPOCH + 1))
    val = [r for r in read_metrics(run_dir) if "val/auc" in r]
    assert len(val) == 1 and val[0]["val/n"] == 16 and 0.0 <= val[0]["val/auc"] <= 1.0, val
    from invasive_dist.checkpoint import load_checkpoint

    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["global_step"] == STEPS_PER_EPOCH and best["world_size"] == 2 and best["global_batch"] == 8
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["resume"] == "auto" and saved["data"]["root"] == str(tiny_data)


def test_preempted_job_saves_requeues_and_resumes_until_done(slurm, tiny_data, tmp_path, cancel_on_exit):
    """SIGUSR1 to the batch shell (the time-limit warning), then `scontrol requeue`: each time the
    training saves the step it stopped at and the next run of the job resumes exactly there."""
    name = "preempt"
    epochs = 2
    total = epochs * STEPS_PER_EPOCH
    p, job, log = sbatch(
        tmp_path,
        name,
        f"data.root={tiny_data}",
        f"train.epochs={epochs}",
        "checkpoint.every_steps=2",
        wait=False,
    )
    assert p.returncode == 0 and re.fullmatch(r"\d+", job), f"sbatch failed: {p.stdout} {p.stderr}"
    cancel_on_exit.append(job)
    run_dir = tmp_path / name
    last = run_dir / "checkpoints" / "last.pt"

    def resumed_then_stepped(n: int) -> bool:
        """The n-th run of the job resumed and logged a training step after it."""
        out = text(log)
        runs = out.split(f"SLURM_RESTART_COUNT={n}")
        if len(runs) < 2:
            return False
        m = re.search(r"resumed from .* step (\d+)", runs[-1])
        return bool(m) and any(int(k) > int(m.group(1)) for k in re.findall(r"\(global (\d+)\)", runs[-1]))

    # 1. The time-limit warning: Slurm sends SIGUSR1 to the batch shell (--signal=B:USR1@120).
    wait_until(last.is_file, "checkpoint (checkpoints/last.pt)", job, log)
    assert _run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    wait_until(
        lambda: resumed_then_stepped(1), "run 2 (SLURM_RESTART_COUNT=1) training after its resume", job, log
    )
    # 2. Slurm ends the job from outside: `scontrol requeue` (as an admin or a preemption would).
    p = _run("scontrol", "requeue", job)
    assert p.returncode == 0, p.stderr
    wait_until(
        lambda: (
            "srun step (torchrun) ended with exit code 0" in text(log).split("SLURM_RESTART_COUNT=2")[-1]
            and "SLURM_RESTART_COUNT=2" in text(log)
        ),
        "run 3 (SLURM_RESTART_COUNT=2) to finish",
        job,
        log,
    )
    out = text(log)

    runs = re.split(r"\n(?=\[train\.sbatch [\d:]+\] job \d+ )", out)
    runs = [r for r in runs if re.search(r"SLURM_RESTART_COUNT=\d", r)]
    counts = [int(re.search(r"SLURM_RESTART_COUNT=(\d+)", r).group(1)) for r in runs]
    assert counts == [0, 1, 2], f"runs of the job by restart count: {counts}\n{out[-6000:]}"
    first, second, third = runs
    assert "SIGUSR1 (time limit near)" in first and f"requeueing job {job}" in first, first[-4000:]
    assert "SIGTERM: Slurm is stopping the job" in second, second[-4000:]
    saved = [int(re.search(r"saved at step (\d+), exiting", r).group(1)) for r in (first, second)]
    resumed = [re.search(r"resumed from (\S+) at epoch (\d+) step (\d+)", r) for r in (second, third)]
    assert all(resumed), f"no 'resumed from' line:\n{out[-6000:]}"
    for stop, m in zip(saved, resumed):
        assert m.group(1) == str(last) and int(m.group(3)) == stop, (
            f"saved at step {stop} but resumed from {m.group(1)} step {m.group(3)}"
        )
    assert 2 <= saved[0] < saved[1] < total, saved
    # Every step trained once: each run resumed exactly where the previous one stopped.
    assert train_steps(run_dir) == list(range(1, total + 1)), train_steps(run_dir)
    val = [r["epoch"] for r in read_metrics(run_dir) if "val/auc" in r]
    assert val == [1, 2], val
    from invasive_dist.checkpoint import load_checkpoint

    state = load_checkpoint(last)
    assert state["global_step"] == total and (state["epoch"], state["step_in_epoch"]) == (epochs, 0)
    assert (run_dir / "checkpoints" / "best.pt").is_file()
