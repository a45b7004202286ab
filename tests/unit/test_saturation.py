"""A confident model's logits (far above 37, where a float64 sigmoid is exactly 1.0) keep their
order through out-of-fold predictions, fold ensembles and the written submission: the same
checkpoint on the same images gives the same AUC wherever it is computed."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from invasive_dist.build import build_data, resolve_batch
from invasive_dist.checkpoint import atomic_torch_save
from invasive_dist.cli import main
from invasive_dist.config import load_config, save_config
from invasive_dist.data import LoaderSpec, Shard, build_loader
from invasive_dist.data.kaggle import read_labels, test_index
from invasive_dist.distributed import build_accelerator, world_info_from_env
from invasive_dist.evaluation import score
from invasive_dist.metrics import roc_auc
from invasive_dist.models import build_model, head_name
from invasive_dist.predict import expit, ordered_probabilities, write_submission

N_FOLDS = 2


def run_cli(*args) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([str(a) for a in args])
    return rc, buf.getvalue()


def same_order(values: np.ndarray, logits: np.ndarray) -> bool:
    """Every pair of images compares the same way by ``values`` as by ``logits`` (ties included)."""
    v, z = np.asarray(values, np.float64), np.asarray(logits, np.float64)
    return bool((np.sign(v[:, None] - v[None, :]) == np.sign(z[:, None] - z[None, :])).all())


def test_ordered_probabilities_keep_the_order_of_extreme_logits(tmp_path):
    z = np.array([40.0, 50.0, 60.0, 60.0, 36.9, 700.0, -800.0, -900.0, -30.0, 1e-20, 2e-20, 0.0, 3.0, -3.0])
    assert (expit(z[:3]) == 1.0).all()  # the saturation: a float64 sigmoid ties them
    p = ordered_probabilities(z)
    assert ((p > 0) & (p < 1)).all()
    assert same_order(p, z)  # distinct logits -> distinct values, equal logits -> equal values
    moderate = (np.abs(z) >= 1) & (np.abs(z) <= 30)
    np.testing.assert_array_equal(p[moderate], expit(z[moderate]))  # untied values are the sigmoid
    tied = np.abs(z) < 1e-10  # 0, 1e-20 and 2e-20 all have the sigmoid 0.5: moved by a few doubles
    np.testing.assert_allclose(p[tied], 0.5, rtol=0, atol=4e-16)
    # Written as the submission is and read back the way a scorer reads it: the order survives.
    write_submission([str(i) for i in range(len(z))], p, tmp_path / "s.csv")
    back = pd.read_csv(tmp_path / "s.csv")["invasive"].to_numpy()
    np.testing.assert_array_equal(back, p)
    # Thousands of saturated logits (a whole test set) still fit below 1.0, in order.
    many = np.linspace(40.0, 4000.0, 5000)
    assert same_order(ordered_probabilities(many)[::7], many[::7])
    assert len(np.unique(ordered_probabilities(many))) == 5000


@pytest.fixture(scope="module")
def saturated_cv(tiny_data, tmp_path_factory):
    """A CV directory of N_FOLDS folds holding the same checkpoint, whose logits are 60 +- ~20."""
    root = tmp_path_factory.mktemp("sat")
    cfgs = []
    for k in range(N_FOLDS):
        cfg = load_config(
            None,
            [
                "model.arch=resnet18",
                "data.image_size=32",
                f"data.n_folds={N_FOLDS}",
                f"data.fold={k}",
                f"data.root={tiny_data}",
                f"output.root={root}",
                f"output.name=cv/fold{k}",
            ],
        )
        cfgs.append(cfg)
    torch.manual_seed(0)
    model = build_model(cfgs[0].model).eval()
    head = model.get_submodule(head_name(model))
    with torch.no_grad():  # a head that is very sure: logits far beyond float64's sigmoid range
        head.weight.mul_(300.0)
        head.bias.fill_(60.0)
    for cfg in cfgs:
        save_config(cfg, cfg.run_dir / "config.yaml")
        atomic_torch_save({"model": model.state_dict(), "ema": None}, cfg.run_dir / "checkpoints" / "best.pt")
    return root / "cv", cfgs, model


def test_a_saturated_model_has_one_auc_in_validation_oof_and_ensemble(saturated_cv, tiny_data):
    cv_dir, cfgs, model = saturated_cv
    acc = build_accelerator(cfgs[0], world_info_from_env())
    # Validation, as the Trainer scores it: AUC of the logits of each fold's validation images.
    val_auc, val_logits, val_labels = [], [], []
    for cfg in cfgs:
        data = build_data(cfg, acc, resolve_batch(cfg, 1), train=False)
        res = score(model, data.val_loader, acc)
        data.close()
        val_auc.append(res.metrics("val")["val/auc"])
        val_logits.append(res.logits)
        val_labels.append(res.labels)
    all_logits = np.concatenate(val_logits)
    assert all_logits.min() > 37.0  # every prediction is 1.0 through a float64 sigmoid
    assert all(a != 0.5 for a in val_auc)  # the model does rank the images (what ties would lose)

    rc, out = run_cli("cv", "--collect", "--run-dir", cv_dir)
    assert rc == 0, out
    summary = json.loads((cv_dir / "cv.json").read_text())
    for k in range(N_FOLDS):
        assert summary["folds"][k]["auc"] == pytest.approx(val_auc[k], abs=1e-9)
    pooled = roc_auc(np.concatenate(val_labels), all_logits)
    assert summary["oof_auc"] == pytest.approx(pooled, abs=1e-9)
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"name": str})
    assert roc_auc(oof["label"], oof["probability"]) == pytest.approx(pooled, abs=1e-9)
    assert same_order(oof["probability"], oof["logit"])
    assert (oof["probability"] < 1.0).all()

    # The fold ensemble on the test images: its submission keeps the order of the model's logits.
    index = test_index(tiny_data)
    loader = build_loader(LoaderSpec.of(index, cfgs[0].data, Shard(0, 1), acc.device, False, 0), cfgs[0].data)
    test_logits = score(model, loader, acc).logits
    truth = read_labels(tiny_data / "test_labels_hidden.csv").set_index("name").loc[index.names, "invasive"]
    for how in ("mean", "rank_mean"):
        out_csv = cv_dir / f"sub_{how}.csv"
        rc, log = run_cli(
            "predict", "--run-dir", cv_dir, "--data", tiny_data, "--out", out_csv, f"predict.ensemble={how}"
        )
        assert rc == 0, log
        sub = pd.read_csv(out_csv, dtype={"name": str})
        assert list(sub["name"]) == index.names
        assert same_order(sub["invasive"], test_logits), how
        assert roc_auc(truth, sub["invasive"]) == pytest.approx(roc_auc(truth, test_logits), abs=1e-9)
    folds = pd.read_csv(cv_dir / "sub_mean_folds.csv", dtype={"name": str})
    for k in range(N_FOLDS):
        np.testing.assert_allclose(folds[f"fold{k}_logit"], test_logits, rtol=1e-6)
