"""launch/train.sh and launch/predict.sh where the environment is not the project's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
