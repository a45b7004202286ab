import json

import numpy as np
import pytest

from invasive_dist.errors import UserError
from invasive_dist.metrics import MetricsWriter, StepTimer, read_metrics, roc_auc, roc_curve, youden_threshold


def brute_auc(labels, scores):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_known_values():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.9, 0.2])) == 0.0
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_auc_refuses_non_finite_scores(bad):
    """All-NaN scores used to give 0.75 for these labels: a number that looks like a result."""
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(UserError, match="1 of 4 are NaN or infinite"):
        roc_auc(labels, np.array([0.1, bad, 0.35, 0.8]))
    with pytest.raises(UserError, match="4 of 4"):
        roc_auc(labels, np.full(4, bad))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = (rng.random(200) < 0.6).astype(int)
        scores = np.round(rng.random(200) + labels * 0.3, 1)  # many ties
        assert roc_auc(labels, scores) == pytest.approx(brute_auc(labels, scores))


def test_writer_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path)
    w.log(1, 1, {"train/loss": 0.5, "val/auc": 0.9})
    w.log(2, 1, {"train/loss": 0.25})
    w.close()
    rows = read_metrics(tmp_path)
    assert rows == [
        {"step": 1, "epoch": 1, "train/loss": 0.5, "val/auc": 0.9},
        {"step": 2, "epoch": 1, "train/loss": 0.25},
    ]
    json.dumps(rows)
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {"train/loss", "val/auc"}
    assert [e.value for e in ea.Scalars("train/loss")] == [0.5, 0.25]


class FakeClock:
    """A clock the test advances: timings that a loaded machine cannot disturb."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_step_timer_accounts_data_wait():
    clock = FakeClock()
    t = StepTimer(clock)
    for _ in range(3):
        t.data_start()
        clock.sleep(0.02)  # waiting for the batch
        t.data_end()
        clock.sleep(0.01)  # the step
        t.step_done(8)
    m = t.read(world_size=2)
    assert 0.5 < m["perf/data_wait_frac"] < 0.9
    assert m["perf/data_wait_frac"] == pytest.approx(2 / 3)
    assert m["perf/step_time_s"] == pytest.approx(0.03)
    assert m["perf/img_per_s_per_device"] == pytest.approx(24 / 0.09)
    assert m["perf/img_per_s"] == pytest.approx(2 * m["perf/img_per_s_per_device"])
    assert m["perf/world_size"] == 2


def test_roc_curve_and_youden():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    fpr, tpr, thr = roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))
    t = youden_threshold(y, s)
    pred = s >= t
    assert (pred & (y == 1)).sum() / 3 - (pred & (y == 0)).sum() / 3 == pytest.approx(max(tpr - fpr))
