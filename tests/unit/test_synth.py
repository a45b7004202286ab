"""The synthetic data set: Kaggle layout, determinism, label balance, resumable writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from invasive_dist.data.synth import draw_labels, image_rng, render_image, synthesize
from invasive_dist.errors import UserError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "kaggle-real-sample"
SMALL = dict(n_train=12, n_test=5, size=(96, 72))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sof_marker(data: bytes) -> int:
    """The JPEG start-of-frame marker byte (0xC0 baseline, 0xC2 progressive), walking the segments."""
    assert data[:2] == b"\xff\xd8"
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, f"bad segment at byte {i}"
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise AssertionError("no SOF marker")


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    synthesize(out, seed=0, **SMALL)
    return out


def test_same_seed_gives_byte_identical_files(small, tmp_path):
    again = tmp_path / "b"
    synthesize(again, seed=0, **SMALL)
    assert tree_bytes(small) == tree_bytes(again)


def test_other_seed_gives_other_images(small, tmp_path):
    other = tmp_path / "c"
    synthesize(other, seed=1, **SMALL)
    a, b = tree_bytes(small), tree_bytes(other)
    images = [k for k in a if k.endswith(".jpg")]
    assert len(images) == 17
    assert all(a[k] != b[k] for k in images)


def test_worker_count_does_not_change_the_files(small, tmp_path):
    out = tmp_path / "w2"
    synthesize(out, seed=0, workers=2, **SMALL)
    assert tree_bytes(small) == tree_bytes(out)


def test_layout_is_the_kaggle_layout(small):
    assert sorted(p.name for p in (small / "train").iterdir()) == sorted(f"{i}.jpg" for i in range(1, 13))
    assert sorted(p.name for p in (small / "test").iterdir()) == sorted(f"{i}.jpg" for i in range(1, 6))
    raw = (small / "train_labels.csv").read_bytes()
    assert raw.startswith(b"name,invasive\r\n")
    assert raw.count(b"\r\n") == raw.count(b"\n") == 13  # CRLF on every line, header included
    rows = read_rows(small / "train_labels.csv")
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, 13)]
    assert {r[1] for r in rows[1:]} <= {"0", "1"}
    sub = read_rows(small / "sample_submission.csv")
    assert sub[0] == ["name", "invasive"]
    assert sub[1:] == [[str(i), "0.5"] for i in range(1, 6)]
    hidden = read_rows(small / "test_labels_hidden.csv")
    assert [r[0] for r in hidden[1:]] == [str(i) for i in range(1, 6)]
    for p in list((small / "train").iterdir()) + list((small / "test").iterdir()):
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 72))
        assert sof_marker(p.read_bytes()) == 0xC0, f"{p} is not a baseline JPEG"


@pytest.mark.skipif(not (REAL / "train_labels_full.csv").is_file(), reason="real sample not available")
def test_layout_matches_the_real_files(small):
    """Same header bytes and line endings as the published files, same kind of JPEG."""
    real_labels = (REAL / "train_labels_full.csv").read_bytes()
    ours = (small / "train_labels.csv").read_bytes()
    assert ours.split(b"\r\n")[0] == real_labels.split(b"\r\n")[0] == b"name,invasive"
    assert real_labels.endswith(b"\r\n") and ours.endswith(b"\r\n")
    real_sub = (REAL / "sample_submission_full.csv").read_bytes().split(b"\n")
    our_sub = (small / "sample_submission.csv").read_bytes().split(b"\n")
    assert our_sub[0] == real_sub[0] and our_sub[1] == real_sub[1] == b"1,0.5"
    real_jpg = (REAL / "train" / "1.jpg").read_bytes()
    assert sof_marker(real_jpg) == sof_marker((small / "train" / "1.jpg").read_bytes()) == 0xC0


def test_full_size_default_is_the_competition_size(tmp_path):
    s = synthesize(tmp_path / "full", n_train=2, n_test=1)
    with Image.open(tmp_path / "full" / "train" / "1.jpg") as im:
        assert im.size == (1154, 866) == s.size


def test_label_balance_is_exact_and_shuffled():
    labels = draw_labels(0, "train", 2295, 0.63)
    assert labels.sum() == round(0.63 * 2295) == 1446  # the real file has 1448 of 2295
    assert 0 < labels[:100].sum() < 100  # shuffled, not sorted
    assert (draw_labels(0, "train", 2295, 0.63) == labels).all()
    assert (draw_labels(1, "train", 2295, 0.63) != labels).any()


def test_summary_counts_match_the_csv(small, tmp_path):
    s = synthesize(tmp_path / "s", n_train=40, n_test=10, size=(32, 24), positive_frac=0.63)
    rows = read_rows(tmp_path / "s" / "train_labels.csv")[1:]
    assert s.n_train_positive == sum(r[1] == "1" for r in rows) == round(0.63 * 40)
    assert (s.n_train, s.n_test, s.n_written) == (40, 10, 50)


def test_flower_heads_follow_the_labels():
    """Positives carry blue-violet/pink-purple heads, negatives do not: a crude colour score
    (share of pixels much bluer than green) must already rank the classes apart."""
    scores, labels = [], []
    for name in range(1, 61):
        invasive = name % 2 == 1
        a = np.asarray(render_image(image_rng(3, "train", name), (96, 72), invasive)).astype(int)
        g, b = a[..., 1], a[..., 2]
        scores.append(((b > g + 30) & (b > 110)).mean())
        labels.append(invasive)
    s, y = np.array(scores), np.array(labels)
    auc = (s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean()
    assert auc > 0.9


def test_interrupted_run_is_resumed_and_leftovers_removed(small, tmp_path):
    out = tmp_path / "r"
    synthesize(out, seed=0, **SMALL)
    (out / "train" / "3.jpg").unlink()
    (out / "test" / "2.jpg").unlink()
    (out / "train" / ".7.jpg.999.tmp").write_bytes(b"half")  # what a killed writer leaves
    s = synthesize(out, seed=0, **SMALL)
    assert s.n_written == 2
    assert tree_bytes(out) == tree_bytes(small)


def test_changed_parameters_regenerate_everything(small, tmp_path):
    out = tmp_path / "p"
    synthesize(out, seed=0, **SMALL)
    s = synthesize(out, seed=0, n_train=6, n_test=2, size=(64, 48))
    assert s.n_written == 8
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(f"{i}.jpg" for i in range(1, 7))
    with Image.open(out / "train" / "1.jpg") as im:
        assert im.size == (64, 48)


def test_refuses_a_folder_that_is_not_synthetic(tmp_path):
    (tmp_path / "kaggle" / "train").mkdir(parents=True)
    (tmp_path / "kaggle" / "train_labels.csv").write_text("name,invasive\n")
    with pytest.raises(UserError, match="synth.json"):
        synthesize(tmp_path / "kaggle", **SMALL)
    assert (tmp_path / "kaggle" / "train_labels.csv").read_text() == "name,invasive\n"


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(n_train=1), "n_train"),
        (dict(size=(8, 72)), "size"),
        (dict(positive_frac=1.5), "positive_frac"),
        (dict(seed=-1), "seed"),
        (dict(quality=0), "quality"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kw, word):
    with pytest.raises(UserError, match=word):
        synthesize(tmp_path / "x", **{**SMALL, **kw})


def colour_score_auc(difficulty: str, n: int = 60) -> float:
    """AUC of the crude colour score of test_flower_heads_follow_the_labels on ``difficulty``."""
    scores, labels = [], []
    for name in range(1, n + 1):
        invasive = name % 2 == 1
        img = render_image(image_rng(3, "train", name), (96, 72), invasive, difficulty=difficulty)
        a = np.asarray(img).astype(int)
        g, b = a[..., 1], a[..., 2]
        scores.append(((b > g + 30) & (b > 110)).mean())
        labels.append(invasive)
    s, y = np.array(scores), np.array(labels)
    return float((s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean())


def test_hard_level_defeats_the_colour_shortcut():
    """On the hard level the look-alikes carry the hydrangea's colours into both classes: the
    pixel-colour score that separates the easy level (> 0.9) is near chance there."""
    assert colour_score_auc("hard") < 0.75


def test_hard_level_is_deterministic_recorded_and_varies_jpeg_quality(tmp_path):
    a = synthesize(tmp_path / "a", seed=0, difficulty="hard", **SMALL).out
    b = synthesize(tmp_path / "b", seed=0, difficulty="hard", workers=2, **SMALL).out
    assert tree_bytes(a) == tree_bytes(b)
    assert '"difficulty": "hard"' in (a / "synth.json").read_text()
    easy = synthesize(tmp_path / "e", seed=0, **SMALL).out
    assert "difficulty" not in (easy / "synth.json").read_text()  # old easy folders stay valid
    assert tree_bytes(a / "train") != tree_bytes(easy / "train")
    tables = set()
    for p in sorted((a / "train").glob("*.jpg")):
        with Image.open(p) as im:
            tables.add(tuple(im.quantization[0]))
            assert sof_marker(p.read_bytes()) == 0xC0  # still baseline, as the real files
    assert len(tables) > 3, "the hard level draws a JPEG quality per image"


@pytest.mark.parametrize(
    "kw, word",
    [(dict(difficulty="extreme"), "difficulty"), (dict(difficulty="hard", flowers="edges"), "flowers")],
)
def test_bad_difficulty_is_a_user_error(tmp_path, kw, word):
    with pytest.raises(UserError, match=word):
        synthesize(tmp_path / "x", **{**SMALL, **kw})
