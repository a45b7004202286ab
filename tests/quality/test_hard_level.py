"""The hard synthetic level stays where recipes differ: learnable, far from solved.

The demo recipe (configs/demo.yaml, as shipped) on 450 hard images, three training seeds: the best
validation AUC must average at least 0.78 (none below 0.70) and at most 0.97; the easy level reaches
1.000 by epoch 2.
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
# Measured: best val AUC 0.876 (seed 0), test AUC 0.855. Floors with margin for noise over seeds and
# machines; below them the recipe or the data pipeline got clearly worse.
FLOOR_MEAN, FLOOR_EACH, SOLVED = 0.78, 0.70, 0.97


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "invasive_dist", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_the_demo_recipe_learns_the_hard_level_without_solving_it(tmp_path):
    """A floor with margin over three training seeds (about a minute each on 2 idle cores)."""
    data = tmp_path / "hard"
    cli("synth", "--out", str(data), "--difficulty", "hard", "--n-train", "450", "--n-test", "1",
        "--size", "384x288", "--workers", "2")  # fmt: skip
    best = {}
    for seed in SEEDS:
        cli("train", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={data}", f"seed={seed}",
            "data.fold_seed=0", f"output.root={tmp_path}", f"output.name=hard{seed}")  # fmt: skip
        aucs = [r["val/auc"] for r in read_metrics(tmp_path / f"hard{seed}") if "val/auc" in r]
        assert len(aucs) == 8 and aucs[-1] > aucs[0], (seed, aucs)  # it learns over the run
        best[seed] = max(aucs)
    mean = sum(best.values()) / len(best)
    print(f"hard level, demo recipe, best val AUC by seed: {best}, mean {mean:.3f}")
    assert mean >= FLOOR_MEAN and min(best.values()) >= FLOOR_EACH, best
    assert mean <= SOLVED, f"the hard level is solved (mean {mean:.3f}): the drawing lost its difficulty"
