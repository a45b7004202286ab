"""The shipped recipes run, and every data backend trains to the demo's AUC bar on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from invasive_dist.cli import main
from invasive_dist.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))

# What a CPU can run in seconds; the rest of each recipe (arch, optimizer, EMA, schedule, TTA,
# augmentations, folds) is kept. ImageNet weights cannot be downloaded in CI: random init.
CPU_STEP = [
    "model.weights=null",
    "data.backend=torch",
    "data.image_size=64",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.torch.num_workers=0",  # one step of each recipe's model; the recipes' 8+ workers would only add start-up
    "data.n_folds=4",
    "data.fold=0",
    "data.gpu_cache.short_side=0",
    "data.global_batch_size=0",
    "train.mixed_precision=no",
    "train.compile=false",
    "train.max_steps=1",
    "train.epochs=1",
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_a_step(recipe, tiny_data, tmp_path):
    rc = main(
        ["train", "--config", str(recipe), *CPU_STEP, f"data.root={tiny_data}", f"output.root={tmp_path}"]
    )
    assert rc == 0
    runs = [p for p in tmp_path.iterdir() if (p / "checkpoints" / "last.pt").is_file()]
    assert len(runs) == 1


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory) -> Path:
    """A smaller cousin of the demo set: 200 train images of 160x120."""
    from invasive_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("demo_like") / "data"
    synthesize(out, n_train=200, n_test=4, size=(160, 120), seed=1, workers=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali", "gpu_cache"])
def test_backend_trains_to_the_demo_bar(backend, demo_like, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    args = [
        "train",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"data.root={demo_like}",
        f"data.backend={backend}",
        "data.image_size=64",
        "data.batch_size=16",
        "data.torch.num_workers=1",
        "train.epochs=4",
        f"output.root={tmp_path}",
        "output.name=run",
    ]
    assert main(args) == 0
    val = [r for r in read_metrics(tmp_path / "run") if "val/auc" in r]
    assert len(val) == 4 and val[-1]["val/n"] == 40
    assert max(r["val/auc"] for r in val) >= 0.95, val
