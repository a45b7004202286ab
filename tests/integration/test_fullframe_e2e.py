"""Full-frame inputs end to end (issue 16 part 1), as a user runs them: ``invasive-dist train`` at a
[height, width] size, then ``predict`` with dihedral TTA, each in its own process. The per-backend
checks of [height, width] sizes are in tests/unit/test_fullframe.py."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_train_and_predict_at_height_width_with_dihedral_tta(tiny_data, tmp_path):
    """What a user runs: train at [48, 64] (full eval), then predict with dihedral TTA: the log says
    which views are averaged and the submission covers every test image once."""
    from ..conftest import FAST_TRAIN, cli

    common = [f"output.root={tmp_path}", "output.name=hw"]
    res = cli(
        "train", *FAST_TRAIN, f"data.root={tiny_data}", *common, "data.image_size=[48, 64]", "train.epochs=1"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "sub.csv"
    res = cli(
        "predict",
        "--run-dir",
        str(tmp_path / "hw"),
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "predict.tta=dihedral",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "the 4 views that keep the shape are averaged" in res.stdout + res.stderr
    rows = out.read_text().splitlines()
    n_test = len(list((tiny_data / "test").glob("*.jpg")))
    assert rows[0] == "name,invasive" and len(rows) == 1 + n_test
