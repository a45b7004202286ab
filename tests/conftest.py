"""Shared fixtures: small synthetic data sets in the Kaggle layout, made by the project's generator."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = ROOT.parent / "shared" / "kaggle-real-sample"

# Tests run on CPU; two cores are shared by the test process and the processes it starts.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """64 train / 12 test images of 96x72, read-only by convention: copy before modifying."""
    from invasive_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(out, n_train=64, n_test=12, size=(96, 72), seed=0)
    return out


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not (REAL_SAMPLE / "train_labels.csv").is_file():
        pytest.skip(f"real competition sample not found at {REAL_SAMPLE}")
    return REAL_SAMPLE


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state (and one precision) per process: a test that builds an Accelerator
    with mixed precision starts from a clean state and leaves one behind for the tests after it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run ``python -m invasive_dist ARGS`` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "invasive_dist", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Small, fast training settings for CPU tests (override lists for `train`). data.torch.num_workers stays
# at the shipped default (2 DataLoader workers): the tests run the path users run.
FAST_TRAIN = [
    "model.arch=resnet18",
    "data.image_size=64",
    "data.batch_size=8",
    "data.n_folds=4",
    "train.epochs=2",
    "train.log_every=2",
    "optim.name=adamw",
    "optim.lr=0.002",
]
