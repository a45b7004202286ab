"""Prediction's pure parts: the TTA views and their mean logit, the fold ensemble (mean and rank mean),
and ensembles of submission files (rows matched by name, malformed files refused). The end-to-end
runs are in tests/integration/test_cv.py and test_train_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from invasive_dist.errors import UserError
from invasive_dist.predict import combine, ensemble_files, expit, logit, tta_logits, tta_views


def test_dihedral_views_are_the_8_distinct_symmetries():
    img = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(1, 3, 5, 5)  # no symmetry at all
    views = tta_views(img, "dihedral")
    assert len(views) == 8
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == 8
    assert torch.equal(views[0], img)
    # Closed under the group: a flip or rotation of any view is another view.
    for v in views:
        assert tuple(v.flip(-1).flatten().tolist()) in flat
        assert tuple(torch.rot90(v, 1, dims=(-2, -1)).flatten().tolist()) in flat
    assert len({tuple(v.flatten().tolist()) for v in tta_views(img, "flips")}) == 4
    with pytest.raises(UserError):
        tta_views(img, "d4")


def test_tta_leaves_an_invariant_model_unchanged():
    torch.manual_seed(0)
    # A per-pixel function followed by global average pooling: invariant to any pixel permutation.
    invariant = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)
    )
    x = torch.randn(5, 3, 16, 16)
    ref = tta_logits(invariant, x, "none")
    assert ref.shape == (5,)
    for mode in ("flips", "dihedral"):
        torch.testing.assert_close(tta_logits(invariant, x, mode), ref, rtol=0, atol=1e-6)
    # ...while a model that sees positions does change, so the views really differ.
    positional = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1))
    assert not torch.allclose(tta_logits(positional, x, "dihedral"), tta_logits(positional, x, "none"))
    # Non-square batches: flips stack, dihedral views are scored one shape at a time.
    wide = torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(
        tta_logits(invariant, wide, "dihedral"), tta_logits(invariant, wide, "none"), atol=1e-6, rtol=0
    )


def test_combine_mean_and_rank_mean():
    # What `invasive-dist predict` does with a CV directory's folds (predict.ensemble): the
    # members' logits are combined, the mean one written as a probability.
    probs = np.array([[0.1, 0.4, 0.9], [0.3, 0.2, 0.8]])
    z = logit(probs)
    np.testing.assert_allclose(combine(z, "mean"), expit(z.mean(0)), rtol=1e-15)
    # Ranks scaled to [0, 1]: row 0 -> 0, .5, 1 and row 1 -> .5, 0, 1.
    np.testing.assert_allclose(combine(z, "rank_mean"), [0.25, 0.25, 1.0])
    np.testing.assert_allclose(combine(np.array([[0.7]]), "rank_mean"), [0.5])  # one image
    with pytest.raises(UserError, match="rank_mean"):
        combine(z, "median")


def test_ensemble_files_mean_and_rank_mean(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("name,invasive\n1,0.1\n2,0.4\n3,0.9\n")
    b.write_text("name,invasive\r\n1,0.3\r\n2,0.2\r\n3,0.8\r\n")  # CRLF like Kaggle's files
    mean = ensemble_files([a, b], "mean")
    assert list(mean["name"]) == ["1", "2", "3"]
    # The mean of the values' logits, as for folds: the geometric mean of the odds.
    odds = np.sqrt(np.array([0.1 / 0.9 * 0.3 / 0.7, 0.4 / 0.6 * 0.2 / 0.8, 0.9 / 0.1 * 0.8 / 0.2]))
    np.testing.assert_allclose(mean["invasive"], odds / (1 + odds), rtol=1e-12)
    # Ranks scaled to [0, 1]: a -> 0, .5, 1 and b -> .5, 0, 1.
    np.testing.assert_allclose(ensemble_files([a, b], "rank_mean")["invasive"], [0.25, 0.25, 1.0])
    np.testing.assert_allclose(combine(logit(np.array([[0.2, 0.2, 0.7]])), "rank_mean"), [0.25, 0.25, 1.0])
    c.write_text("name,invasive\n1,0.1\n3,0.9\n2,0.4\n")
    with pytest.raises(UserError, match=r"c\.csv.*row 3"):
        ensemble_files([a, c], "mean")
    with pytest.raises(UserError, match="rank_mean"):
        ensemble_files([a, b], "median")


@pytest.mark.parametrize(
    "text, match",
    [
        ("name,invasive\n1,0.1\n2,0.4,0.5\n3,0.9\n", r"d\.csv line 3: .*3 field"),
        ("name,invasive\n1,0.1\n2,high\n3,0.9\n", r"d\.csv row 3: image '2' has invasive='high'"),
        ("name,invasive\n1,0.1\n2,nan\n3,0.9\n", r"d\.csv row 3: .*finite"),
        ("name,p\n1,0.1\n2,0.4\n3,0.9\n", r"d\.csv: header"),
    ],
)
def test_ensemble_files_refuses_a_malformed_file_naming_it_and_the_row(tmp_path, text, match):
    a, d = tmp_path / "a.csv", tmp_path / "d.csv"
    a.write_text("name,invasive\n1,0.1\n2,0.4\n3,0.9\n")
    d.write_text(text)
    with pytest.raises(UserError, match=match):
        ensemble_files([a, d], "mean")
