"""Pseudo-labels are chosen on the folds' mean probability, whatever ``predict.ensemble`` wrote into
the submission, and a selection of only one class says so and what to do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from invasive_dist.cv import pseudo_message, select_pseudo
from invasive_dist.predict import folds_file, logit, read_member_logits, write_predictions

N_FOLDS, N = 5, 500
FOLDS = [f"fold{k}" for k in range(N_FOLDS)]


def pick(tmp_path, fold_logits: np.ndarray, how: str) -> pd.DataFrame:
    """What `cv --pseudo-rounds 1` does after the round's folds predicted the test set."""
    names = [str(i + 1) for i in range(fold_logits.shape[1])]
    out = tmp_path / f"submission_{how}.csv"
    write_predictions(names, fold_logits, how, out, FOLDS)  # what predict_run writes
    names, z = read_member_logits(folds_file(out))
    return select_pseudo(names, z, 0.05, 0.95)


@pytest.mark.parametrize("how", ["mean", "rank_mean"])
def test_unsure_folds_give_no_pseudo_labels_under_either_ensemble(tmp_path, how):
    rng = np.random.default_rng(0)
    # The folds agree on the order (as trained folds do) but no fold is sure of any image.
    p = 0.5 + 0.14 * rng.uniform(-1, 1, size=N) + rng.uniform(-0.01, 0.01, size=(N_FOLDS, N))
    assert p.min() > 0.35 and p.max() < 0.65
    unsure = logit(p)
    assert len(pick(tmp_path, unsure, how)) == 0  # rank_mean's values would give the top/bottom 5 %


@pytest.mark.parametrize("how", ["mean", "rank_mean"])
def test_sure_images_are_picked_with_their_label(tmp_path, how):
    rng = np.random.default_rng(1)
    p = rng.uniform(0.35, 0.65, size=(N_FOLDS, N))
    p[:, :20] = rng.uniform(0.97, 0.999, size=(N_FOLDS, 20))  # images 1-20: invasive, all folds agree
    p[:, 20:30] = rng.uniform(0.001, 0.03, size=(N_FOLDS, 10))  # images 21-30: not invasive
    p[0, 30:40] = 0.999  # images 31-40: one sure fold is not enough
    chosen = pick(tmp_path, logit(p), how)
    assert list(chosen["name"]) == [str(i) for i in range(1, 31)]
    assert list(chosen["invasive"]) == [1] * 20 + [0] * 10


def test_pseudo_labels_of_one_class_are_a_warning_that_says_what_to_do(tmp_path):
    (tmp_path / "cv.json").write_text('{"folds": [{"auc": 0.5}, {"auc": 0.97}]}')
    one_class = pd.DataFrame({"name": ["1", "2", "3"], "invasive": [1, 1, 1]})
    msg = pseudo_message(one_class, 100, 0.05, 0.95, tmp_path / "pseudo_round1.csv", tmp_path)
    assert "warning: all 3 pseudo-labels are class 1" in msg
    assert "0.500" in msg and "retrain" in msg and "--pseudo-low" in msg
    both = pd.DataFrame({"name": ["1", "2"], "invasive": [1, 0]})
    assert "warning" not in pseudo_message(both, 100, 0.05, 0.95, tmp_path / "p.csv", tmp_path)
