"""The Kaggle workflow in one process on the tiny data set: k-fold CV with out-of-fold predictions,
skipping finished folds, collecting folds trained elsewhere (Slurm arrays), predicting with a fold
ensemble, TTA, ensembles of submission files, pseudo-labels, and the analysis plots."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from invasive_dist.cli import main
from invasive_dist.data.kaggle import read_labels, stratified_folds
from invasive_dist.metrics import roc_auc

from ..conftest import ROOT
from ..procs import clean_env

N_FOLDS = 3
# Tiny CPU settings: 32 px, 3 steps per fold, one epoch.
CV_FAST = [
    "model.arch=resnet18",
    "data.image_size=32",
    "data.batch_size=16",
    f"data.n_folds={N_FOLDS}",
    "train.epochs=1",
    "train.log_every=2",
    "optim.name=adamw",
    "optim.lr=0.002",
]


def run_cli(*args: str) -> tuple[int, str]:
    """``invasive-dist ARGS`` in this process; (exit code, stdout + stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([str(a) for a in args])
    return rc, buf.getvalue()


def cv_args(data: Path, root: Path, name: str, *extra: str) -> list[str]:
    return ["cv", *CV_FAST, f"data.root={data}", f"output.root={root}", f"output.name={name}", *extra]


def decodes(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def copy_fold(src: Path, dst: Path, with_oof: bool) -> None:
    """A fold run as a Slurm array task would leave it (copy2 keeps mtimes, so oof.csv stays
    newer than best.pt)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    shutil.copy2(src / "metrics.jsonl", dst / "metrics.jsonl")
    shutil.copy2(src / "checkpoints" / "best.pt", dst / "checkpoints" / "best.pt")
    if with_oof:
        shutil.copy2(src / "oof.csv", dst / "oof.csv")


@pytest.fixture(scope="module")
def cv_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    rc, out = run_cli(*cv_args(tiny_data, root, "cv"))
    assert rc == 0, out
    return root / "cv", out


# ----------------------------------------------------------------------------------------------
# Cross-validation


def test_every_image_in_exactly_one_oof_fold(cv_run, tiny_data):
    cv_dir, _ = cv_run
    labels = read_labels(tiny_data / "train_labels.csv")
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"name": str})
    assert list(oof.columns) == ["name", "label", "fold", "probability", "logit"]
    assert not oof["name"].duplicated().any()
    assert sorted(oof["name"]) == sorted(labels["name"])
    by_name = oof.set_index("name")
    assert (by_name.loc[labels["name"], "label"].to_numpy() == labels["invasive"].to_numpy()).all()
    # The fold of each image is the one the stratified split (seed 0) validates it in.
    expected = stratified_folds(labels["invasive"].to_numpy(), N_FOLDS, seed=0)
    assert (by_name.loc[labels["name"], "fold"].to_numpy() == expected).all()
    assert oof["probability"].between(0, 1).all()
    for k in range(N_FOLDS):
        part = pd.read_csv(cv_dir / f"fold{k}" / "oof.csv", dtype={"name": str})
        assert set(part["name"]) == set(oof.loc[oof["fold"] == k, "name"])


def test_oof_auc_is_the_auc_of_oof_csv(cv_run):
    cv_dir, out = cv_run
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"name": str})
    summary = json.loads((cv_dir / "cv.json").read_text())
    assert summary["n_folds"] == N_FOLDS and summary["n_images"] == 64
    assert summary["oof_auc"] == pytest.approx(roc_auc(oof["label"], oof["logit"]), abs=1e-12)
    assert summary["oof_auc"] == pytest.approx(roc_auc(oof["label"], oof["probability"]), abs=1e-12)
    for f in summary["folds"]:
        part = oof[oof["fold"] == f["fold"]]
        assert f["n"] == len(part)
        assert f["auc"] == pytest.approx(roc_auc(part["label"], part["logit"]), abs=1e-12)
    assert f"OOF AUC {summary['oof_auc']:.4f}" in out
    assert decodes(cv_dir / "roc.png")[0] > 100


def test_rerun_skips_finished_folds(cv_run, tiny_data):
    cv_dir, _ = cv_run
    files = [
        cv_dir / f"fold{k}" / name for k in range(N_FOLDS) for name in ("checkpoints/best.pt", "oof.csv")
    ]
    before = [p.stat().st_mtime_ns for p in files]
    rc, out = run_cli(*cv_args(tiny_data, cv_dir.parent, "cv"))
    assert rc == 0, out
    assert out.count("skipped") == N_FOLDS
    assert "training in" not in out
    assert [p.stat().st_mtime_ns for p in files] == before


def test_predict_cv_dir_ensembles_folds_in_sample_order(cv_run, tiny_data, tmp_path):
    cv_dir, _ = cv_run
    sample = pd.read_csv(tiny_data / "sample_submission.csv", dtype={"name": str})
    out = tmp_path / "sub.csv"
    rc, log = run_cli("predict", "--run", cv_dir, "--data", tiny_data, "--out", out, "predict.tta=flips")
    assert rc == 0, log
    sub = pd.read_csv(out, dtype={"name": str})
    assert list(sub.columns) == ["name", "invasive"]
    assert list(sub["name"]) == list(sample["name"])
    assert sub["invasive"].between(0, 1).all()
    folds = pd.read_csv(tmp_path / "sub_folds.csv", dtype={"name": str})
    members = folds[[f"fold{k}_logit" for k in range(N_FOLDS)]].to_numpy()  # logits
    np.testing.assert_allclose(sub["invasive"], 1 / (1 + np.exp(-members.mean(1))), rtol=1e-12)

    rc, log = run_cli(
        "predict", "--run", cv_dir, "--data", tiny_data, "--out", tmp_path / "rank.csv",
        "predict.tta=flips", "predict.ensemble=rank_mean",
    )  # fmt: skip
    assert rc == 0, log
    ranked = pd.read_csv(tmp_path / "rank.csv", dtype={"name": str})
    assert list(ranked["name"]) == list(sample["name"])
    hand = np.mean([pd.Series(m).rank().sub(1).div(len(m) - 1).to_numpy() for m in members.T], axis=0)
    np.testing.assert_allclose(ranked["invasive"], hand, atol=1e-12)


def test_collect_scores_folds_trained_elsewhere(cv_run, tmp_path):
    """Folds trained by `train` array tasks (no oof.csv): --collect scores them like cv did."""
    cv_dir, _ = cv_run
    arr = tmp_path / "arr"
    for k in range(N_FOLDS):
        copy_fold(cv_dir / f"fold{k}", arr / f"fold{k}", with_oof=False)
    rc, out = run_cli("cv", "--collect", "--run", arr)
    assert rc == 0, out
    assert out.count("scoring the validation fold") == N_FOLDS
    a = pd.read_csv(cv_dir / "oof.csv", dtype={"name": str})
    b = pd.read_csv(arr / "oof.csv", dtype={"name": str})
    assert list(a["name"]) == list(b["name"]) and list(a["fold"]) == list(b["fold"])
    np.testing.assert_allclose(a["probability"], b["probability"], atol=1e-6)
    np.testing.assert_allclose(a["logit"], b["logit"], atol=1e-5)
    assert json.loads((arr / "cv.json").read_text())["oof_auc"] == pytest.approx(
        roc_auc(b["label"], b["logit"])
    )

    shutil.rmtree(arr / "fold2")
    rc, out = run_cli("cv", "--collect", "--run", arr)
    assert rc == 2 and "fold(s) 2 of 3" in out


def test_array_task_trains_its_fold_and_the_last_one_writes_the_cv_files(cv_run, tiny_data, tmp_path):
    cv_dir, _ = cv_run
    rc, out = run_cli(*cv_args(tiny_data, tmp_path, "arr/fold1", "data.fold=0"))
    assert rc == 2 and "data.fold=1" in out  # the name and the fold disagree: refused before any work
    assert not (tmp_path / "arr").exists()

    for k in (0, 2):  # the other array tasks have finished
        copy_fold(cv_dir / f"fold{k}", tmp_path / "arr" / f"fold{k}", with_oof=True)
    rc, out = run_cli(*cv_args(tiny_data, tmp_path, "arr/fold1", "data.fold=1"))
    assert rc == 0, out
    assert "fold 1/3: training" in out and "fold 0/3" not in out
    summary = json.loads((tmp_path / "arr" / "cv.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2] and summary["n_images"] == 64


def test_pseudo_labels_train_but_never_validate(cv_run, tiny_data, tmp_path):
    from invasive_dist.distributed import build_accelerator, world_info_from_env
    from invasive_dist.predict import load_run_config
    from invasive_dist.train import Trainer, build_parts

    cv_dir, _ = cv_run
    ps = tmp_path / "ps"
    shutil.copytree(cv_dir, ps)  # round 1 is done (mtimes kept): only round 2 trains
    rc, out = run_cli(
        *cv_args(
            tiny_data, tmp_path, "ps", "--pseudo-rounds", "1", "--pseudo-low", "0.5", "--pseudo-high", "0.6"
        )
    )
    assert rc == 0, out
    assert out.count("skipped") == N_FOLDS

    folds = pd.read_csv(ps / "submission_folds.csv", dtype={"name": str})  # the round-1 folds
    pseudo = pd.read_csv(ps / "pseudo_round1.csv", dtype={"name": str})
    logits = folds.set_index("name")[[f"fold{k}_logit" for k in range(N_FOLDS)]]
    p = (1 / (1 + np.exp(-logits))).mean(axis=1)  # the folds' mean probability
    expected = p[(p <= 0.5) | (p >= 0.6)]
    assert list(pseudo["name"]) == list(expected.index) and len(pseudo) > 0
    assert (pseudo["invasive"].to_numpy() == (expected >= 0.6).to_numpy()).all()
    pseudo_names = {f"test/{n}" for n in pseudo["name"]}

    acc = build_accelerator(load_run_config(ps / "round2"), world_info_from_env())
    labels = read_labels(tiny_data / "train_labels.csv")
    folds = stratified_folds(labels["invasive"].to_numpy(), N_FOLDS, seed=0)
    for k in range(N_FOLDS):
        cfg = load_run_config(ps / "round2" / f"fold{k}")
        assert Path(cfg.data.pseudo_csv) == ps / "pseudo_round1.csv"
        world = world_info_from_env()
        trainer = Trainer(cfg, acc, world, build_parts(cfg, acc, world))
        assert not pseudo_names & set(trainer.val_idx.names)
        assert set(trainer.val_idx.names) == set(labels["name"][folds == k])
        assert pseudo_names <= set(trainer.train_idx.names)
        acc.free_memory()
    oof2 = pd.read_csv(ps / "round2" / "oof.csv", dtype={"name": str})
    assert sorted(oof2["name"]) == sorted(labels["name"])  # validation: labelled images only
    summary = json.loads((ps / "round2" / "cv.json").read_text())
    assert summary["round"] == 2 and summary["n_pseudo"] == len(pseudo)


@pytest.mark.slow
def test_cv_under_torchrun_scores_each_image_once_like_one_process(tiny_data, tmp_path):
    """2 ranks train both folds one after another in one launch; their OOF predictions equal
    those one process computes from the same checkpoints (so every image was scored once, by
    the right fold's model, whatever the number of ranks)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = clean_env()
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "invasive_dist"]
    cmd += cv_args(tiny_data, tmp_path, "ddp", "data.n_folds=2", "data.batch_size=8", "predict.tta=flips")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("[cv] OOF AUC") == 1  # printed by the main process only
    ddp = pd.read_csv(tmp_path / "ddp" / "oof.csv", dtype={"name": str})
    labels = read_labels(tiny_data / "train_labels.csv")
    assert sorted(ddp["name"]) == sorted(labels["name"]) and not ddp["name"].duplicated().any()

    one = tmp_path / "one"
    for k in range(2):
        copy_fold(tmp_path / "ddp" / f"fold{k}", one / f"fold{k}", with_oof=False)
    rc, log = run_cli("cv", "--collect", "--run", one)
    assert rc == 0, log
    single = pd.read_csv(one / "oof.csv", dtype={"name": str})
    assert list(single["name"]) == list(ddp["name"])
    np.testing.assert_allclose(single["probability"], ddp["probability"], atol=1e-5)
    np.testing.assert_allclose(single["logit"], ddp["logit"], atol=1e-4)


def test_cv_refuses_pseudo_rounds_for_one_fold(tiny_data, tmp_path):
    rc, out = run_cli(*cv_args(tiny_data, tmp_path, "x", "--only-fold", "0", "--pseudo-rounds", "1"))
    assert rc == 2 and "--collect" in out
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# Analysis


def test_analyze_writes_pngs_for_cv_dir_and_single_run(cv_run, tmp_path):
    cv_dir, _ = cv_run
    rc, out = run_cli("analyze", "--run", cv_dir, "--out", tmp_path / "a")
    assert rc == 0, out
    for name in ("roc.png", "confusion.png", "wrong.png"):
        assert min(decodes(tmp_path / "a" / name)) > 100
    summary = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert summary["n"] == 64 and sum(summary["confusion"].values()) == 64

    single = tmp_path / "single"  # one run without oof.csv: its validation fold is scored first
    copy_fold(cv_dir / "fold1", single, with_oof=False)
    rc, out = run_cli("analyze", "--run", single, "--threshold", "youden")
    assert rc == 0, out
    assert (single / "oof.csv").is_file()
    for name in ("roc.png", "confusion.png", "wrong.png"):
        decodes(single / "analysis" / name)
    summary = json.loads((single / "analysis" / "analysis.json").read_text())
    assert summary["threshold_rule"] == "youden" and summary["n"] == 21
