"""End to end in one process: train -> checkpoints/metrics/TensorBoard -> predict -> submission,
resume from `last`, and bit-exact resume on CPU."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from invasive_dist.cli import main
from invasive_dist.metrics import read_metrics

from ..conftest import FAST_TRAIN

REQUIRED_TRAIN_TAGS = {"train/loss", "train/lr", "train/grad_norm", "perf/img_per_s"}
REQUIRED_VAL_TAGS = {"val/loss", "val/auc", "val/n"}


def train(tmp_path, data, name, *extra):
    rc = main(
        ["train", *FAST_TRAIN, f"data.root={data}", f"output.root={tmp_path}", f"output.name={name}", *extra]
    )
    return rc, tmp_path / name


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    rc, run = train(tmp, tiny_data, "run")
    assert rc == 0
    return run


def test_outputs(trained, tiny_data):
    run = trained
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["root"] == str(tiny_data) and cfg["train"]["epochs"] == 2
    rows = read_metrics(run)
    tags = set().union(*(r.keys() for r in rows))
    assert REQUIRED_TRAIN_TAGS | REQUIRED_VAL_TAGS <= tags
    val = [r for r in rows if "val/auc" in r]
    assert [r["epoch"] for r in val] == [1, 2]
    n_val = 64 // 4
    assert all(r["val/n"] == n_val for r in val)
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert REQUIRED_TRAIN_TAGS | REQUIRED_VAL_TAGS <= set(ea.Tags()["scalars"])


@pytest.mark.parametrize("tta", ["none", "dihedral"])
def test_predict_submission_format(trained, tiny_data, tmp_path, tta):
    out = tmp_path / f"sub-{tta}.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained),
                "--data",
                str(tiny_data),
                "--out",
                str(out),
                f"predict.tta={tta}",
            ]
        )
        == 0
    )
    sub = pd.read_csv(out, dtype={"name": str})
    sample = pd.read_csv(tiny_data / "sample_submission.csv", dtype={"name": str})
    assert list(sub.columns) == ["name", "invasive"]
    assert list(sub["name"]) == list(sample["name"])
    assert sub["invasive"].between(0, 1).all()
    assert sub["invasive"].nunique() > 1  # a real model, not a constant


def test_predict_without_run_is_user_error(tmp_path, tiny_data, capsys):
    assert main(["predict", "--run", str(tmp_path), "--data", str(tiny_data)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_resume_continues_epoch_count(tmp_path, tiny_data, capsys):
    rc, run = train(tmp_path, tiny_data, "r", "train.epochs=1")
    assert rc == 0
    rc, run = train(tmp_path, tiny_data, "r", "train.epochs=2", "resume=auto")
    assert rc == 0
    assert "resumed from" in capsys.readouterr().out
    val = [r for r in read_metrics(run) if "val/auc" in r]
    assert [r["epoch"] for r in val] == [1, 2]
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # no step trained twice


def test_exact_resume_mid_epoch(tmp_path, tiny_data):
    """Stopped at step 3 (mid-epoch 1) and resumed, a run ends with the same weights, bit for bit."""
    extra = ["train.epochs=2", "data.torch.num_workers=1", "train.ema_decay=0.9"]
    assert train(tmp_path, tiny_data, "full", *extra)[0] == 0
    assert train(tmp_path, tiny_data, "cut", *extra, "train.max_steps=3")[0] == 0
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    assert train(tmp_path, tiny_data, "cut", *extra, "resume=auto")[0] == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    va = [r["val/auc"] for r in read_metrics(tmp_path / "full") if "val/auc" in r]
    vb = [r["val/auc"] for r in read_metrics(tmp_path / "cut") if "val/auc" in r]
    assert va == vb


def test_bad_config_key_fails_before_work(tmp_path, tiny_data, capsys):
    rc, run = train(tmp_path, tiny_data, "bad", "train.epochz=1")
    assert rc == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not run.exists()


def test_bad_image_refused_then_skipped(tmp_path, tiny_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "train" / "5.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    rc, run = train(tmp_path, data, "refuse")
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "on_bad_file=skip" in err
    assert not (run / "checkpoints").exists()
    rc, run = train(tmp_path, data, "skip", "data.on_bad_file=skip", "train.epochs=1")
    err = capsys.readouterr().err
    assert rc == 0
    assert "leaving out" in err and str(bad) in err
    val = [r for r in read_metrics(run) if "val/n" in r]
    # 63 usable images; the validation fold of 4 holds 15 or 16 of them, never the bad one.
    assert val and val[-1]["val/n"] in (15, 16)


def test_predict_refuses_bad_test_image(trained, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "test" / "3.jpg"
    bad.write_bytes(b"not a jpeg at all")
    out = tmp_path / "sub.csv"
    assert main(["predict", "--run", str(trained), "--data", str(data), "--out", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()


def test_report_scores_submission_with_hidden_labels(trained, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["report", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "val/auc" in out and "test auc" not in out  # no submission yet
    assert main(["predict", "--run", str(run), "--data", str(tiny_data)]) == 0
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test auc" in out and "submission.csv" in out
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2


def test_early_stopping_stops_and_stays_stopped_on_resume(tmp_path, tiny_data, monkeypatch, capsys):
    """With a validation AUC that never improves, patience 2 means 3 epochs, and a resume adds none."""
    from invasive_dist import train as train_mod

    def flat_evaluate(self, loader=None, model=None):
        return train_mod.EvalResult(
            index=np.arange(4), logits=np.array([0.1, 0.2, 0.3, 0.4]), labels=np.array([0.0, 1.0, 0.0, 1.0])
        )

    monkeypatch.setattr(train_mod.Trainer, "evaluate", flat_evaluate)
    args = ["train.epochs=6", "train.early_stop_patience=2", "train.max_steps=0"]
    assert train(tmp_path, tiny_data, "es", *args)[0] == 0
    assert "early stop" in capsys.readouterr().out
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "es") if "val/auc" in r]
    assert epochs == [1, 2, 3]
    assert train(tmp_path, tiny_data, "es", *args, "resume=auto")[0] == 0
    assert "early stop" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(tmp_path / "es") if "val/auc" in r] == [1, 2, 3]


def test_best_breaks_auc_ties_on_loss_and_never_takes_nan(tmp_path, tiny_data, monkeypatch, capsys):
    """Epoch 1 scores NaN, epochs 2 and 3 the same AUC with a lower loss at 3: best.pt is epoch 3
    (a NaN best used to stay best for ever, and a tie kept the first epoch), and `report` says so."""
    from invasive_dist import train as train_mod

    labels = np.array([0.0, 1.0, 0.0, 1.0])
    by_epoch = {
        0: np.array([np.nan, np.nan, np.nan, np.nan]),
        1: np.array([-0.5, 0.5, -0.4, 0.4]),  # AUC 1.0
        2: np.array([-3.0, 3.0, -2.0, 2.0]),  # AUC 1.0, lower loss
    }

    def scripted_evaluate(self, model=None):
        return train_mod.EvalResult(index=np.arange(4), logits=by_epoch[self.epoch], labels=labels)

    monkeypatch.setattr(train_mod.Trainer, "evaluate", scripted_evaluate)
    rc, run = train(tmp_path, tiny_data, "ties", "train.epochs=3")
    assert rc == 0
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 3 and best["best_auc"] == 1.0
    val = [r for r in read_metrics(run) if "val/auc" in r]
    assert np.isnan(val[0]["val/auc"]) and [r["val/is_best"] for r in val] == [0.0, 1.0, 1.0]
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 0
    assert "(best, epoch 3;" in capsys.readouterr().out


def test_raw_and_ema_both_scored_and_the_better_one_kept(tmp_path, tiny_data, monkeypatch, capsys):
    """With EMA on, each epoch scores both weights; here the raw ones are better: they are what
    val/auc reports, what best.pt says to use, what predict loads and what `report` names."""
    from invasive_dist import train as train_mod
    from invasive_dist.predict import load_model_for_inference, load_run_config

    labels = np.array([0.0, 1.0, 0.0, 1.0])

    def scripted_evaluate(self, model=None):
        raw = model is None or model is self.raw_model
        logits = np.array([-2.0, 2.0, -1.0, 1.0]) if raw else np.array([1.0, -1.0, 2.0, -2.0])
        return train_mod.EvalResult(index=np.arange(4), logits=logits, labels=labels)

    monkeypatch.setattr(train_mod.Trainer, "evaluate", scripted_evaluate)
    rc, run = train(tmp_path, tiny_data, "ema", "train.epochs=1", "train.ema_decay=0.9")
    assert rc == 0
    assert "raw weights (raw 1.0000/" in capsys.readouterr().out
    (row,) = [r for r in read_metrics(run) if "val/auc" in r]
    assert (row["val/auc"], row["val/auc_raw"], row["val/auc_ema"], row["val/ema"]) == (1.0, 1.0, 0.0, 0.0)
    assert row["val/loss"] == row["val/loss_raw"] < row["val/loss_ema"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert (best["best_source"], best["eval_weights"]) == ("raw", "model")
    model = load_model_for_inference(load_run_config(run), run, "best")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in best["model"].items())
    assert not all(torch.equal(loaded[k], v) for k, v in best["ema"].items())
    assert main(["report", "--run", str(run)]) == 0
    assert "(best, epoch 1, raw weights;" in capsys.readouterr().out
