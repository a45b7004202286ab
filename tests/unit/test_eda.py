"""EDA output: the PNGs decode with the expected sizes, the summary agrees with the files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from invasive_dist.data.synth import synthesize
from invasive_dist.eda import run_eda
from invasive_dist.errors import UserError
from invasive_dist.plots import THUMB

from .test_plots import grid_shape

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "kaggle-real-sample"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eda") / "data"
    synthesize(out, n_train=14, n_test=4, size=(96, 72), seed=0)
    return out


def csv_counts(path: Path) -> dict[str, int]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {"invasive": sum(r[1] == "1" for r in rows), "not_invasive": sum(r[1] == "0" for r in rows)}


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes completely
        return im.size


def test_files_exist_and_decode(data, tmp_path):
    out = tmp_path / "eda"
    summary = run_eda(data, out, per_class=3)
    for name in ("class_balance.png", "samples_invasive.png", "samples_not_invasive.png", "summary.json"):
        assert (out / name).is_file(), name
    assert png_size(out / "class_balance.png") == (640, 480)
    # 3 thumbnails in one row: each cell is the thumbnail box plus padding, plus a caption row.
    w, h = png_size(out / "samples_invasive.png")
    assert w >= 3 * THUMB[0] and THUMB[1] < h < 2 * THUMB[1]
    assert grid_shape(out / "samples_invasive.png") == grid_shape(out / "samples_not_invasive.png") == (1, 3)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_summary_matches_the_files(data, tmp_path):
    s = run_eda(data, tmp_path / "eda")
    counts = csv_counts(data / "train_labels.csv")
    assert s["classes"] == counts and s["n_label_rows"] == 14
    assert s["positive_fraction"] == pytest.approx(counts["invasive"] / 14, abs=1e-4)
    assert (s["n_train_images"], s["n_test_images"]) == (14, 4)
    assert s["image_sizes"] == {"96x72": 18}
    for split in ("train", "test"):
        sizes = [p.stat().st_size for p in (data / split).glob("*.jpg")]
        b = s["bytes"][split]
        assert (b["min"], b["max"]) == (min(sizes), max(sizes))
        assert b["mean"] == pytest.approx(sum(sizes) / len(sizes), abs=0.1)


def test_more_rows_when_more_samples(data, tmp_path):
    run_eda(data, tmp_path / "a", per_class=2)
    run_eda(data, tmp_path / "b", per_class=6)  # 4 per row: two rows
    ha = png_size(tmp_path / "a" / "samples_not_invasive.png")[1]
    hb = png_size(tmp_path / "b" / "samples_not_invasive.png")[1]
    assert hb > ha + THUMB[1]
    assert grid_shape(tmp_path / "a" / "samples_not_invasive.png") == (1, 2)
    assert grid_shape(tmp_path / "b" / "samples_not_invasive.png") == (2, 4)


def test_same_seed_same_sample_grid(data, tmp_path):
    run_eda(data, tmp_path / "a", per_class=3, seed=5)
    run_eda(data, tmp_path / "b", per_class=3, seed=5)
    a = (tmp_path / "a" / "samples_invasive.png").read_bytes()
    assert a == (tmp_path / "b" / "samples_invasive.png").read_bytes()


def test_broken_and_missing_images_do_not_stop_eda(data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "train" / "1.jpg").write_bytes(b"")
    (broken / "train" / "2.jpg").unlink()
    s = run_eda(broken, tmp_path / "eda", per_class=20)
    assert s["n_train_images"] == 13
    assert s["unreadable_headers"] == [str(broken / "train" / "1.jpg")]
    assert s["image_sizes"] == {"96x72": 16}


def test_bad_label_file_is_a_user_error_naming_it(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "train_labels.csv").write_text("name,invasive\n1,7\n")
    with pytest.raises(UserError, match="train_labels.csv"):
        run_eda(bad, tmp_path / "eda")


@pytest.mark.skipif(not (REAL / "train_labels.csv").is_file(), reason="real sample not available")
def test_real_sample(tmp_path):
    s = run_eda(REAL, tmp_path / "eda", per_class=2)
    assert s["classes"] == {"invasive": 4, "not_invasive": 6}
    assert s["image_sizes"] == {"1154x866": 20}
    assert s["bytes"]["train"]["min"] == min(p.stat().st_size for p in (REAL / "train").glob("*.jpg"))
