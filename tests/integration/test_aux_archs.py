"""Inception-v3 and GoogLeNet (the architectures with auxiliary heads) through the CLI, as a user
runs them: train (stopped mid-epoch by ``train.max_steps``), resume to the end of the epoch
(validation runs), predict a submission from the ``best`` checkpoint, and ``bench``; one in the
``torch`` backend, the other in ``dali``. Inception-v3 without its aux head at its 75 px minimum (the
default ``model.aux_loss_weight=0``); GoogLeNet with both heads on (0.3, torchvision's weight), at
32 px. Inception-v3 with its head (299 px minimum) takes a real step in test_all_archs.py: here
each of its training steps would cost ~10 s on CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from invasive_dist.cli import main
from invasive_dist.metrics import read_metrics

from ..conftest import FAST_TRAIN, ROOT
from ..procs import clean_env, kill_tree

pytestmark = pytest.mark.slow

CASES = {
    "inception_v3": ["model.arch=inception_v3", "data.image_size=75"],
    "googlenet-aux": ["model.arch=googlenet", "model.aux_loss_weight=0.3", "data.image_size=32"],
}


# Two of the four (arch, backend) pairs: the model sees the same image tensors from every backend
# (tests/unit/test_backends.py), and each pair costs 20-60 s here.
@pytest.mark.parametrize("case, backend", [("inception_v3", "torch"), ("googlenet-aux", "dali")])
def test_train_resume_evaluate_predict(case, backend, tiny_data, tmp_path, capsys):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    # One epoch is 48 / 8 = 6 steps (tiny_data: 64 images, 4 folds).
    args = [*FAST_TRAIN, *CASES[case], f"data.backend={backend}", "train.epochs=1"]
    args += [f"data.root={tiny_data}", f"output.root={tmp_path}", "output.name=run"]
    run = tmp_path / "run"
    assert main(["train", *args, "train.max_steps=2"]) == 0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 2
    has_aux = any(k.startswith(("AuxLogits.", "aux1.", "aux2.")) for k in state["model"])
    assert has_aux == (case == "googlenet-aux")
    if case == "googlenet-aux":  # resuming without the heads the checkpoint holds: a clear refusal
        capsys.readouterr()
        assert main(["train", *args, "resume=auto", "model.aux_loss_weight=0"]) == 2
        assert re.search(r"does not match this run's .*aux_loss_weight=0\.0", capsys.readouterr().err)
    assert main(["train", *args, "resume=auto"]) == 0
    rows = read_metrics(run)
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    val = [r for r in rows if "val/auc" in r]
    assert len(val) == 1 and val[0]["val/n"] == 16 and 0.0 <= val[0]["val/auc"] <= 1.0
    out = tmp_path / "submission.csv"
    assert main(["predict", "--run", str(run), "--data", str(tiny_data), "--out", str(out)]) == 0
    sub = pd.read_csv(out)
    assert len(sub) == 12 and sub["invasive"].between(0, 1).all()


def test_bench_runs_inception(tiny_data, tmp_path):
    argv = ["--steps", "2", "--warmup", "1", "--out", str(tmp_path), "--backend", "synthetic"]
    argv += [*FAST_TRAIN, *CASES["inception_v3"], f"data.root={tiny_data}", f"output.root={tmp_path}"]
    assert main(["bench", *argv]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["arch"] == "inception_v3"
    assert result["model_img_per_s"] > 0 and result["rows"][0]["e2e_img_per_s"] > 0


def test_aux_heads_train_under_ddp_with_two_torchrun_processes(tiny_data, tmp_path):
    """DDP fails on a parameter without a gradient and must carry the (main, aux1, aux2) outputs
    through its forward: two ranks with GoogLeNet's two heads, real torchrun and gloo."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "invasive_dist", "train", *FAST_TRAIN]
    cmd += [*CASES["googlenet-aux"], "data.batch_size=4", "train.max_steps=2", f"data.root={tiny_data}"]
    cmd += [f"output.root={tmp_path}", "output.name=run"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=ROOT,
            env=clean_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            pytest.fail(f"torchrun still running after 300 s:\n{log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 2 and state["world_size"] == 2
    assert state["model"]["aux2.fc2.weight"].shape == (1, 1024)
