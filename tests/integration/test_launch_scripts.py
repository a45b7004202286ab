"""launch/train.sh and launch/predict.sh: the commands they build (``--dry-run`` prints the command and
stops, nothing is trained), the argument they name when one is wrong, and what they say where the
environment is not the project's."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ..procs import clean_env

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = ROOT / "launch" / "train.sh"


def run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_dry_run_prints_the_command_without_torchrun_on_path(tmp_path):
    # A copy of the scripts outside the checkout: the checkout may have a .venv with torchrun.
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for name in ("train.sh", "common.sh"):
        (repo / "launch" / name).write_text((ROOT / "launch" / name).read_text())
    (repo / "c.yaml").write_text("{}\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}  # no venv on PATH
    p = subprocess.run(
        ["bash", "launch/train.sh", "--dry-run", "-n", "2", "c.yaml", "train.epochs=1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert (
        "+ torchrun --standalone --nnodes=1 --nproc_per_node=2 -m invasive_dist train --config c.yaml"
        in p.stderr
    )
    assert "torchrun is not on PATH here" in p.stderr


def test_torchrun_of_another_environment_is_blamed_on_the_environment(tmp_path):
    """The Python beside torchrun cannot import torch: say so, not that invasive_dist is old."""
    bin_dir = tmp_path / "otherenv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in [
        ("torchrun", "echo should-not-run; exit 99"),
        ("python", "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1"),
    ]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    run_dir, data = tmp_path / "run", tmp_path / "data"
    run_dir.mkdir(), data.mkdir()
    env = {**os.environ, "TORCHRUN": str(bin_dir / "torchrun")}
    p = run("predict.sh", "--run-dir", str(run_dir), "--data", str(data), env=env)
    assert p.returncode == 2 and "should-not-run" not in p.stdout, p.stdout + p.stderr
    assert f"{bin_dir}/python (the Python of {bin_dir}/torchrun) cannot import invasive_dist" in p.stderr
    assert "No module named 'torch'" in p.stderr and "Wrong Python environment" in p.stderr


# ------------------------------------------------------------------------------------------------
# launch/*.sh argument handling (no training: --dry-run prints the command and stops)


def sh(*args: str, script: Path = TRAIN_SH) -> tuple[int, str]:
    p = subprocess.run(
        [str(script), *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    return p.returncode, p.stdout + p.stderr


def test_train_sh_builds_the_torchrun_command(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    rc, out = sh("--dry-run", "-n", "3", str(cfg), "train.epochs=1")
    assert rc == 0, out
    assert (
        f"--standalone --nnodes=1 --nproc_per_node=3 -m invasive_dist train --config {cfg} train.epochs=1"
        in out
    )
    rc, out = sh(
        "--dry-run", "--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--master", "n1:29500", str(cfg)
    )
    assert rc == 0, out
    assert (
        "--nnodes=2 --node_rank=1 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=n1:29500 "
        "--rdzv_id=invasive-dist --rdzv_conf=is_host=false -m invasive_dist train"
    ) in out
    # elastic: any 1..2 nodes, the nodes left re-form the job (tests/cluster/test_elastic_hosts.py)
    rc, out = sh(
        "--dry-run",
        "-n",
        "2",
        "--nnodes",
        "1:2",
        "--max-restarts",
        "3",
        "--node-rank",
        "0",
        "--master",
        "n1:29500",
        str(cfg),
    )
    assert rc == 0, out
    assert (
        "--nnodes=1:2 --node_rank=0 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=n1:29500 "
        "--rdzv_id=invasive-dist --rdzv_conf=is_host=true --max_restarts=3 -m invasive_dist train"
    ) in out


def test_train_sh_takes_config_as_every_command_does(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    for args in (["--config", str(cfg)], [f"--config={cfg}"]):
        rc, out = sh("--dry-run", "-n", "2", *args, "train.epochs=1")
        assert rc == 0, out
        assert f"-m invasive_dist train --config {cfg} train.epochs=1" in out, out


@pytest.mark.slow  # two ranks under torchrun (about 1 min on 2 busy cores)
def test_a_user_error_under_train_sh_prints_one_line_and_exits_2(tmp_path, tiny_data):
    """Both ranks refuse a folder that holds another run: one message, no torchrun banner, exit 2."""
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    p = subprocess.run(
        [
            TRAIN_SH,
            "-n",
            "2",
            "--config",
            cfg,
            f"data.root={tiny_data}",
            f"output.root={taken.parent}",
            "output.name=taken",
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert out.count("invasive-dist train: error:") == 1 and "already holds a run" in out, out
    assert "Traceback" not in out and "ChildFailedError" not in out, out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing CONFIG"),
        (["-n", "x", "CFG"], "-n: 'x' is not a positive integer"),
        (["--gpus", "0", "CFG"], "--gpus: '0' is not a positive integer"),
        (["--bogus", "CFG"], "unknown option '--bogus'"),
        (["no/such.yaml"], "CONFIG 'no/such.yaml' is not a file"),
        (["CFG", "epochs3"], "override 'epochs3' is not of the form key.path=value"),
        (["--nnodes", "2", "CFG"], "--nnodes 2 needs --master ADDR:PORT"),
        (["--nnodes", "2", "--master", "h:1", "CFG"], "--nnodes 2 needs --node-rank R"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--master", "h:1", "CFG"],
            "--node-rank 2 must be below --nnodes 2",
        ),
        (["--nnodes", "2", "--node-rank", "0", "--master", "h", "CFG"], "--master: 'h' is not ADDR:PORT"),
        (["--master", "h:1", "CFG"], "--master/--node-rank need --nnodes > 1"),
        (["--nnodes", "3:2", "--node-rank", "0", "--master", "h:1", "CFG"], "'3:2' needs 1 <= MIN <= MAX"),
        (["--max-restarts", "-1", "CFG"], "--max-restarts: '-1' is not a non-negative integer"),
        (["-n"], "-n needs a value"),
    ],
)
def test_train_sh_names_the_wrong_argument(tmp_path, args, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    rc, out = sh(*[str(cfg) if a == "CFG" else a for a in args])
    assert rc == 2 and message in out, out


def test_predict_sh_checks_its_arguments(tmp_path):
    rc, out = sh("--data", str(tmp_path), script=ROOT / "launch" / "predict.sh")
    assert rc == 2 and "missing --run-dir RUN_DIR" in out, out
    rc, out = sh(
        "--run", str(tmp_path / "nope"), "--data", str(tmp_path), script=ROOT / "launch" / "predict.sh"
    )
    assert rc == 2 and "--run-dir '" in out and "is not a directory" in out, out


@pytest.mark.slow  # asks `python -m invasive_dist predict --help` (which imports torch) what it accepts
def test_predict_sh_builds_the_command(tmp_path):
    rc, out = sh(
        "--dry-run",
        "--run",
        str(tmp_path),
        "--data",
        str(tmp_path),
        "predict.tta=flips",
        script=ROOT / "launch" / "predict.sh",
    )
    assert rc == 0 and f"--data {tmp_path}" in out and out.rstrip().endswith("predict.tta=flips"), out
    # torchrun with --run-dir (torchrun rejects --run); one process without torchrun if the CLI
    # has no --run-dir yet.
    assert f"-m invasive_dist predict --run-dir {tmp_path}" in out or re.search(
        rf"python\S* -m invasive_dist predict --run {tmp_path}", out
    ), out


@pytest.mark.slow  # two ranks under torchrun (about 1 min on 2 busy cores)
def test_sigterm_to_train_sh_saves_and_exits_143_without_a_traceback(tmp_path, tiny_data):
    """What Slurm's preemption or scancel sends to the step: the workers save and stop (143), and
    the agent says so in one line instead of torchrun's SignalException traceback."""
    import signal
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = [TRAIN_SH, "-n", "2", "--config", cfg, f"data.root={tiny_data}", f"output.root={tmp_path}",
            "output.name=term", "train.epochs=50", "data.image_size=32", "data.batch_size=4", "train.log_every=1"]  # fmt: skip
    log = tmp_path / "out.log"
    with open(log, "w") as f:
        p = subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while "step 2/" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    out = log.read_text()
    assert rc == 143, out[-3000:]
    assert "launch: torchrun got SIGTERM" in out and "SIGTERM received" in out, out[-3000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-3000:]
    assert (tmp_path / "term" / "checkpoints" / "last.pt").is_file()
