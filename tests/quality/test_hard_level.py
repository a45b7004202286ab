"""The hard synthetic level stays where recipes differ: learnable, far from solved.

The demo recipe (configs/demo.yaml, as shipped) on 450 hard images: the validation AUC must end
between 0.70 and 0.97. Measured 0.86 (test 0.85) on 2 cores; the easy level reaches 1.000 by epoch 2.
A drawing change that makes the level trivial (the colour shortcut back) or hopeless (heads hidden)
fails here before it silently changes docs/model-quality.md's table. The table itself:
tests/quality/recipe_table.py (about 40 minutes, not a test).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from invasive_dist.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "invasive_dist", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_demo_recipe_learns_the_hard_level_without_solving_it(tmp_path):
    data = tmp_path / "hard"
    cli("synth", "--out", str(data), "--difficulty", "hard", "--n-train", "450", "--n-test", "1",
        "--size", "384x288", "--workers", "2")  # fmt: skip
    cli("train", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={data}",
        f"output.root={tmp_path}", "output.name=hard")  # fmt: skip
    aucs = [r["val/auc"] for r in read_metrics(tmp_path / "hard") if "val/auc" in r]
    print(f"hard level, demo recipe: val AUC by epoch {[round(a, 3) for a in aucs]}")
    assert len(aucs) == 8
    assert 0.70 <= max(aucs) <= 0.97, aucs
    assert aucs[-1] > aucs[0], "no learning over the run"
