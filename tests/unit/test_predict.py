"""`invasive-dist predict` on a run: the data check it runs follows the run's data settings, and a
run without the checkpoint asked for says what to do; `invasive-dist report` on a CV directory."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from invasive_dist.checkpoint import atomic_torch_save
from invasive_dist.cli import main
from invasive_dist.config import load_config, save_config
from invasive_dist.cv import write_cv_files
from invasive_dist.data.kaggle import read_labels
from invasive_dist.metrics import roc_auc
from invasive_dist.models import build_model
from invasive_dist.predict import ordered_probabilities, write_predictions


def run_cli(*args) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([str(a) for a in args])
    return rc, buf.getvalue()


def make_run(run_root: Path, name: str, data: Path, *overrides: str, checkpoint: bool = True) -> Path:
    """A run folder as `train` leaves it: config.yaml and (unless told) checkpoints/best.pt."""
    cfg = load_config(
        None,
        ["model.arch=resnet18", "data.image_size=32", f"data.root={data}", f"output.root={run_root}",
         f"output.name={name}", *overrides],
    )  # fmt: skip
    save_config(cfg, cfg.run_dir / "config.yaml")
    if checkpoint:
        torch.manual_seed(0)
        state = {"model": build_model(cfg.model).state_dict(), "ema": None}
        atomic_torch_save(state, cfg.run_dir / "checkpoints" / "best.pt")
    return cfg.run_dir


def test_predict_checks_the_runs_label_file_and_honours_check_cache(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train_labels.csv").rename(data / "labels.csv")
    runs = tmp_path / "runs"
    run = make_run(runs, "r", data, "data.labels_csv=labels.csv")

    rc, out = run_cli("predict", "--run-dir", run, "--data", data, "data.check_cache=false")
    assert rc == 0, out
    assert not (runs / ".data-check").exists()  # no cache read or written when it is off
    rc, out = run_cli("predict", "--run-dir", run, "--data", data)
    assert rc == 0, out
    caches = list((runs / ".data-check").iterdir())
    assert len(caches) == 1  # the one training writes for this data folder and label file
    assert json.loads(caches[0].read_text())["report"]["labels_csv"] == "labels.csv"
    sub = pd.read_csv(run / "submission.csv", dtype={"name": str})
    assert len(sub) == 12


@pytest.mark.parametrize("which", ["best", "last"])
def test_predict_without_the_checkpoint_says_what_to_do(tiny_data, tmp_path, which):
    run = make_run(tmp_path, "empty", tiny_data, checkpoint=False)
    rc, out = run_cli("predict", "--run-dir", run, "--data", tiny_data, f"predict.checkpoint={which}")
    assert rc == 2
    assert f"checkpoints/{which}.pt does not exist" in out
    assert "has no checkpoint" in out and "invasive-dist train" in out
    assert "predict.checkpoint=last" not in out  # there is no last one either


def test_predict_of_a_run_with_only_last_offers_it(tiny_data, tmp_path):
    run = make_run(tmp_path, "unvalidated", tiny_data, checkpoint=False)
    atomic_torch_save({"model": {}, "ema": None}, run / "checkpoints" / "last.pt")
    rc, out = run_cli("predict", "--run-dir", run, "--data", tiny_data)
    assert rc == 2 and "checkpoints/best.pt does not exist" in out
    assert "use predict.checkpoint=last" in out


def test_report_on_a_cv_dir_gives_fold_oof_and_ensemble_test_auc(tiny_data, tmp_path):
    """A CV directory as `cv` leaves it (fold runs, their oof.csv, cv.json, the ensemble's
    submission): `report` summarises it instead of refusing it for its missing metrics.jsonl."""
    rng = np.random.default_rng(0)
    labels = read_labels(tiny_data / "train_labels.csv")
    fold_of = np.arange(len(labels)) % 2
    cv_dir = tmp_path / "cv"
    for k in range(2):
        run = make_run(tmp_path, f"cv/fold{k}", tiny_data, "data.n_folds=2", f"data.fold={k}")
        part = labels[fold_of == k]
        z = part["invasive"].to_numpy() * 2.0 + rng.normal(size=len(part))
        oof = pd.DataFrame(
            {"name": part["name"], "label": part["invasive"], "fold": k,
             "probability": ordered_probabilities(z), "logit": z}
        )  # fmt: skip
        oof.to_csv(run / "oof.csv", index=False)
    summary = write_cv_files(cv_dir, 2)
    truth = read_labels(tiny_data / "test_labels_hidden.csv")
    z = truth["invasive"].to_numpy() + rng.normal(size=(2, len(truth)))
    write_predictions(list(truth["name"]), z, "mean", cv_dir / "submission.csv", ["fold0", "fold1"])

    rc, out = run_cli("report", "--run-dir", cv_dir)
    assert rc == 0, out
    aucs = ", ".join(f"{f['auc']:.4f}" for f in summary["folds"])
    assert f"fold AUCs      {aucs}" in out
    assert f"OOF AUC        {summary['oof_auc']:.4f} over {len(labels)} images" in out
    test_auc = roc_auc(truth["invasive"], z.mean(0))
    assert f"test auc       {test_auc:.4f}" in out

    (cv_dir / "cv.json").unlink()
    rc, out = run_cli("report", "--run-dir", cv_dir)
    assert rc == 2 and f"cv --collect --run-dir {cv_dir}" in out
