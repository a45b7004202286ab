import numpy as np
import pytest

from invasive_dist.data.kaggle import read_labels, split, stratified_folds, test_index, train_index
from invasive_dist.errors import UserError


def labels_file(tmp_path, text: bytes):
    p = tmp_path / "train_labels.csv"
    p.write_bytes(text)
    return p


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_labels_crlf_and_lf(tmp_path, eol):
    p = labels_file(tmp_path, eol.join([b"name,invasive", b"1,0", b"2,1", b"10,1"]) + eol)
    df = read_labels(p)
    assert list(df["name"]) == ["1", "2", "10"]
    assert list(df["invasive"]) == [0, 1, 1]
    assert df["invasive"].dtype == np.int64


def test_real_label_file_loads(real_sample):
    df = read_labels(real_sample / "train_labels_full.csv")
    assert len(df) == 2295
    assert int(df["invasive"].sum()) == 1448
    idx = train_index(real_sample, "train_labels.csv")
    assert len(idx) == 10 and all(p.is_file() for p in idx.paths)


def test_real_test_names_in_submission_order(real_sample):
    idx = test_index(real_sample)
    assert idx.names == [str(i) for i in range(1, 11)]
    assert (idx.labels == -1).all()


def test_real_full_sample_submission_keeps_its_order(real_sample, tmp_path):
    # The published 1531-row file (CRLF, probabilities 0.5) through the same parser as the sample.
    (tmp_path / "sample_submission.csv").write_bytes(
        (real_sample / "sample_submission_full.csv").read_bytes()
    )
    idx = test_index(tmp_path)
    assert len(idx) == 1531 and idx.names[:3] == ["1", "2", "3"] and idx.names[-1] == "1531"
    assert idx.paths[0] == tmp_path / "test" / "1.jpg"


@pytest.mark.parametrize(
    "rows, line, match",
    [
        (b"1,0.5\r\n2,0.5,extra\r\n", 3, "3 field"),
        (b"1,0.5\r\n2,0.5\r\n1,0.5\r\n", 4, "more than once"),
        (b"1,0.5\r\nx7,0.5\r\n", 3, "not an integer"),
    ],
)
def test_malformed_sample_submission_row_is_refused_naming_file_and_line(tmp_path, rows, line, match):
    sub = tmp_path / "sample_submission.csv"
    sub.write_bytes(b"name,invasive\r\n" + rows)
    with pytest.raises(UserError, match=match) as e:
        test_index(tmp_path)
    assert f"{sub} line {line}:" in str(e.value)


@pytest.mark.parametrize("text, match", [(b"id,p\n1,0.5\n", "header"), (b"name,invasive\n", "no rows")])
def test_unusable_sample_submission_is_refused(tmp_path, text, match):
    (tmp_path / "sample_submission.csv").write_bytes(text)
    with pytest.raises(UserError, match=match) as e:
        test_index(tmp_path)
    assert str(tmp_path / "sample_submission.csv") in str(e.value)


def test_test_index_from_folder_when_no_sample_submission(tmp_path):
    (tmp_path / "test").mkdir()
    for n in ["10", "2", "1"]:
        (tmp_path / "test" / f"{n}.jpg").write_bytes(b"x")
    assert test_index(tmp_path).names == ["1", "2", "10"]


@pytest.mark.parametrize(
    "text, match",
    [
        (b"id,label\n1,0\n", "header"),
        (b"name,invasive\n1,2\n", "row 2"),
        (b"name,invasive\n1,0\n1,1\n", "more than once"),
        (b"", "empty"),
    ],
)
def test_bad_label_files_name_the_file(tmp_path, text, match):
    p = labels_file(tmp_path, text)
    with pytest.raises(UserError, match=match) as e:
        read_labels(p)
    assert str(p) in str(e.value)


def test_missing_data_root_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="synth"):
        train_index(tmp_path / "nope")


def test_folds_stratified_disjoint_covering_deterministic():
    rng = np.random.default_rng(1)
    labels = (rng.random(503) < 0.63).astype(np.int64)
    folds = stratified_folds(labels, 5, seed=7)
    assert set(folds) == {0, 1, 2, 3, 4}
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    for f in range(5):
        pos = labels[folds == f].mean()
        assert abs(pos - labels.mean()) < 0.02
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=7))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=8))


def test_split_partitions_the_index(tmp_path):
    rows = [b"name,invasive"] + [f"{i},{i % 3 == 0:d}".encode() for i in range(1, 41)]
    labels_file(tmp_path, b"\r\n".join(rows) + b"\r\n")
    idx = train_index(tmp_path)
    seen = []
    for f in range(4):
        tr, va = split(idx, 4, f, seed=0)
        assert not set(tr.names) & set(va.names)
        assert len(tr) + len(va) == 40
        seen += va.names
    assert sorted(seen, key=int) == [str(i) for i in range(1, 41)]
