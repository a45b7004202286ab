"""The data check: a good set passes, every defect is found and names its file, the cache works,
and garbage input never crashes the check or the torch decoder."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import invasive_dist.data.check as check_mod
from invasive_dist.data.check import Problem, cached_check, check_data
from invasive_dist.data.kaggle import test_index
from invasive_dist.data.synth import synthesize
from invasive_dist.data.torch_backend import decode_rgb
from invasive_dist.errors import UserError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "kaggle-real-sample"
needs_real = pytest.mark.skipif(not (REAL / "train_labels.csv").is_file(), reason="real sample not available")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("check") / "pristine"
    synthesize(out, n_train=10, n_test=4, size=(96, 72), seed=0)
    return out


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A fresh, writable copy of a good 10+4 image set."""
    out = tmp_path / "data"
    shutil.copytree(pristine, out)
    return out


def kinds(report) -> list[str]:
    return sorted(p.kind for p in report.problems)


def only(report, kind: str) -> Problem:
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, report.format()
    return found[0]


def labels_text(root: Path) -> str:
    return (root / "train_labels.csv").read_bytes().decode()  # keeps the CRLF line endings


def set_label(root: Path, name: str, value: str) -> None:
    lines = labels_text(root).split("\r\n")
    lines = [f"{name},{value}" if line.split(",")[0] == name else line for line in lines]
    (root / "train_labels.csv").write_bytes("\r\n".join(lines).encode())


def bad_huffman(good: bytes) -> bytes:
    """A JPEG whose headers parse but whose Huffman table is bogus: only a full decode fails."""
    i = good.index(b"\xff\xc4")  # DHT segment: marker, length (2), class/id (1), 16 code counts
    return good[: i + 5] + b"\xff" * 16 + good[i + 21 :]


def jpeg_bytes(mode: str = "RGB", size=(96, 72), **save) -> bytes:
    colour = {"RGB": (40, 120, 60), "L": 128, "CMYK": (10, 20, 30, 40)}[mode]
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "JPEG", **save)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The good case.


def test_good_synthetic_set_passes(data):
    r = check_data(data)
    assert r.ok and r.problems == [] and r.bad_names == set()
    assert (r.n_label_rows, r.n_train_files, r.n_test_files, r.n_test_listed) == (10, 10, 4, 4)
    assert r.n_positive + r.n_negative == 10 and r.n_positive == round(0.63 * 10)
    assert "OK: no problems found" in r.format()
    r.require("train")
    r.require("predict")


@needs_real
def test_real_sample_checks_ok():
    r = check_data(REAL)
    assert r.ok, r.format()
    assert (r.n_label_rows, r.n_train_files, r.n_test_files) == (10, 10, 10)
    assert (r.n_positive, r.n_negative) == (4, 6)


@needs_real
def test_real_full_label_file_counts_and_missing_images():
    """The full label file lists 2,295 images; only 10 are here, so 2,285 are missing."""
    r = check_data(REAL, labels_csv="train_labels_full.csv", decode=False)
    assert (r.n_label_rows, r.n_positive, r.n_negative) == (2295, 1448, 847)
    missing = [p for p in r.problems if p.kind == "missing-file"]
    assert len(missing) == 2285 and not r.ok
    assert len(r.bad_names) == 2285 and "11" in r.bad_names and "10" not in r.bad_names
    assert r.blocking("train", on_bad_file="skip") == []  # skip trains on the 10 that exist


# ----------------------------------------------------------------------------------------------
# The label file.


def test_missing_label_file(data):
    (data / "train_labels.csv").unlink()
    r = check_data(data)
    p = only(r, "missing-labels")
    assert not r.ok and p.fatal and "train_labels.csv" in p.message
    with pytest.raises(UserError, match="train_labels.csv"):
        r.require("train", on_bad_file="skip")


@pytest.mark.parametrize(
    "text",
    [
        "id,label\r\n1,0\r\n",  # wrong header
        "1,0\r\n2,1\r\n",  # no header at all
        "name,invasive,extra\r\n1,0,x\r\n",  # extra column
    ],
)
def test_bad_header(data, text):
    (data / "train_labels.csv").write_text(text)
    r = check_data(data)
    p = only(r, "labels-header")
    assert not r.ok and str(data / "train_labels.csv") in p.message and "name,invasive" in p.message


@pytest.mark.parametrize("bad", ["2", "0.5", "-1", "yes", ""])
def test_labels_outside_0_1(data, bad):
    set_label(data, "4", bad)
    r = check_data(data)
    p = only(r, "bad-label")
    assert not r.ok and "line 5" in p.message and "'4'" in p.message and repr(bad) in p.message
    assert "train_labels.csv" in p.message
    assert r.blocking("train", on_bad_file="skip"), "a bad label is not skippable"


def test_non_integer_name(data):
    (data / "train_labels.csv").write_text(labels_text(data) + "abc,1\r\n")
    r = check_data(data)
    p = only(r, "bad-name")
    assert not r.ok and "'abc'" in p.message and "train_labels.csv line 12" in p.message
    assert "abc" in r.bad_names
    assert str(data / "train" / "abc.jpg") in only(r, "missing-file").message
    assert r.blocking("train", on_bad_file="skip") == []


def test_duplicate_name(data):
    (data / "train_labels.csv").write_text(labels_text(data) + "3,1\r\n")
    r = check_data(data)
    p = only(r, "duplicate-name")
    assert not r.ok and "'3'" in p.message and "line 4" in p.message and "line 12" in p.message
    assert r.blocking("train", on_bad_file="skip"), "duplicates are not skippable"


@pytest.mark.parametrize(
    "raw, kind",
    [
        (b"", "labels-empty"),
        (b"name,invasive\r\n", "labels-empty"),
        (b"\xff\xfe\x00garbage\x00", "labels-unreadable"),
        (b"name,invasive\r\n1,0,7\r\n", "labels-row"),
        (b'name,invasive\r\n"1,0\r\n', "labels-row"),
    ],
)
def test_garbage_label_files_are_problems_not_crashes(data, raw, kind):
    (data / "train_labels.csv").write_bytes(raw)
    r = check_data(data)
    assert not r.ok
    p = [p for p in r.problems if p.kind == kind]
    assert p and "train_labels.csv" in p[0].message


def test_lf_and_bom_label_files_are_fine(data):
    (data / "train_labels.csv").write_bytes(
        b"\xef\xbb\xbf" + labels_text(data).replace("\r\n", "\n").encode()
    )
    assert check_data(data).ok


# ----------------------------------------------------------------------------------------------
# Image files.


def test_label_row_without_image(data):
    (data / "train" / "3.jpg").unlink()
    r = check_data(data)
    p = only(r, "missing-file")
    assert not r.ok and str(data / "train" / "3.jpg") in p.message and p.path_or_name == "3"
    assert r.bad_names == {"3"}
    assert r.blocking("train", on_bad_file="skip") == []
    with pytest.raises(UserError, match="3.jpg"):
        r.require("train")
    r.require("train", on_bad_file="skip")


def test_image_without_label_row_is_a_warning(data):
    shutil.copy(data / "train" / "1.jpg", data / "train" / "999.jpg")
    r = check_data(data)
    p = only(r, "unlabelled-file")
    assert r.ok and not p.fatal and "999.jpg" in p.message and r.n_train_files == 11


@pytest.mark.parametrize(
    "content, kind, word",
    [
        (b"", "empty-file", "empty"),
        ("half", "truncated", "truncated"),
        ("png", "not-jpeg", "PNG"),
        (b"hello, I am a text file\n", "not-jpeg", "text"),
        ("no-eoi", "truncated", "truncated"),
        ("corrupt-header", "corrupt", "decoded"),
        ("bad-huffman", "corrupt", "decoded"),
    ],
)
def test_bad_image_files(data, content, kind, word):
    path = data / "train" / "5.jpg"
    good = path.read_bytes()
    if content == "half":
        content = good[: len(good) // 2]
    elif content == "png":
        buf = io.BytesIO()
        Image.new("RGB", (96, 72)).save(buf, "PNG")
        content = buf.getvalue()
    elif content == "no-eoi":
        content = good[:-2]
    elif content == "bad-huffman":
        content = bad_huffman(good)
    elif content == "corrupt-header":
        content = good[:2] + b"\xff\xe0\x00\x02" + b"\xff\xc0\x00\x03\x00" + good[-2:]
    path.write_bytes(content)
    r = check_data(data)
    p = only(r, kind)
    assert not r.ok and p.fatal and str(path) in p.message and word in p.message
    assert r.bad_names == {"5"}
    assert r.blocking("train", on_bad_file="skip") == []


@pytest.mark.parametrize("mode, kind", [("CMYK", "cmyk"), ("L", "grayscale")])
def test_cmyk_and_grayscale(data, mode, kind):
    path = data / "train" / "2.jpg"
    path.write_bytes(jpeg_bytes(mode))
    r = check_data(data)
    p = only(r, kind)
    assert r.ok and not p.fatal and str(path) in p.message and "convert" in p.message
    strict = check_data(data, grayscale_cmyk="error")
    p = only(strict, kind)
    assert not strict.ok and p.fatal and strict.bad_names == {"2"}
    # What the warning promises: the torch decoder gives 3-channel RGB.
    img = decode_rgb(path)
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 72, 96)


def test_exif_rotated_is_a_warning_and_decoded_upright(data):
    path = data / "train" / "6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer must turn it 90 degrees clockwise
    path.write_bytes(jpeg_bytes("RGB", size=(96, 72), exif=exif.tobytes()))
    r = check_data(data)
    p = only(r, "exif-rotated")
    assert r.ok and not p.fatal and str(path) in p.message and "torch decoder applies" in p.message
    assert tuple(decode_rgb(path).shape) == (3, 96, 72)  # what the warning promises


def test_trailing_bytes_after_the_image_are_a_warning(data):
    path = data / "train" / "7.jpg"
    path.write_bytes(path.read_bytes() + b"TRAILER-of-some-phone-app")
    r = check_data(data)
    p = only(r, "trailing-data")
    assert r.ok and not p.fatal and str(path) in p.message


def test_jpeg_with_end_markers_written_over_its_middle_is_corrupt(data):
    """Pillow decodes such a file without an error (the lower part flat grey); the check names it.
    A JPEG appended after the image (a phone's thumbnail trailer) still passes."""
    path = data / "train" / "5.jpg"
    good = path.read_bytes()
    mid = len(good) // 2
    damaged = good[:mid] + b"\xff\xd9" * 16 + good[mid + 32 :]  # same length
    assert len(damaged) == len(good)
    path.write_bytes(damaged)
    with Image.open(path) as im:
        im.load()  # no error: what the check must not rely on
    p = only(check_data(data), "corrupt")
    assert p.fatal and str(path) in p.message and "end-of-image marker" in p.message
    assert p.path_or_name == "5"
    path.write_bytes(good + good)  # another whole JPEG after the image: a trailer, not damage
    assert check_data(data).ok


def test_headers_only_mode_finds_file_level_problems_but_not_bad_entropy_data(data):
    (data / "train" / "8.jpg").write_bytes(b"")
    nine = data / "train" / "9.jpg"
    nine.write_bytes(nine.read_bytes()[: nine.stat().st_size // 2])
    ten = data / "train" / "10.jpg"
    ten.write_bytes(bad_huffman(ten.read_bytes()))
    r = check_data(data, decode=False)
    assert kinds(r) == ["empty-file", "truncated"] and not r.decoded
    assert kinds(check_data(data)) == ["corrupt", "empty-file", "truncated"]


# ----------------------------------------------------------------------------------------------
# The test set.


def test_missing_and_broken_test_images_block_predict_only(data):
    (data / "test" / "2.jpg").unlink()
    t3 = data / "test" / "3.jpg"
    t3.write_bytes(t3.read_bytes()[:300])
    r = check_data(data)
    assert kinds(r) == ["test-missing-file", "test-truncated"]
    assert not r.ok and r.bad_names == set()
    assert r.blocking("train") == []
    assert {p.path_or_name for p in r.blocking("predict")} == {"2", "3"}
    assert str(data / "test" / "2.jpg") in only(r, "test-missing-file").message
    with pytest.raises(UserError, match="predict"):
        r.require("predict")


def test_test_set_problems_in_the_submission_and_folder(data):
    rows = "".join(f"{n},0.5\n" for n in ["1", "2", "3", "4", "1", "x"])
    (data / "sample_submission.csv").write_text("name,invasive\n" + rows)
    shutil.copy(data / "test" / "1.jpg", data / "test" / "77.jpg")
    r = check_data(data)
    assert {"test-duplicate-name", "test-bad-name", "test-unlisted-file"} <= set(kinds(r))
    assert "77.jpg" in only(r, "test-unlisted-file").message


@pytest.mark.parametrize(
    "rows, kind",
    [
        ("1,0.5\r\n2,0.5,0.5\r\n3,0.5\r\n4,0.5\r\n", "test-labels-row"),
        ("1,0.5\r\n2,0.5\r\n3,0.5\r\n4,0.5\r\n2,0.5\r\n", "test-duplicate-name"),
        ("1,0.5\r\n2,0.5\r\nthree,0.5\r\n4,0.5\r\n", "test-bad-name"),
    ],
)
def test_check_reports_the_sample_submission_row_that_test_index_refuses(data, rows, kind):
    sub = data / "sample_submission.csv"
    sub.write_bytes(b"name,invasive\r\n" + rows.encode())
    with pytest.raises(UserError) as e:
        test_index(data)
    refused = str(e.value)
    r = check_data(data)
    # One parser: the check's problem is the loader's refusal, word for word, and it stops predict.
    assert only(r, kind).message == refused and f"{sub} line " in refused
    assert [p.message for p in r.blocking("predict")] == [refused]
    assert r.blocking("train") == []


def test_no_test_set_at_all(data):
    (data / "sample_submission.csv").unlink()
    shutil.rmtree(data / "test")
    r = check_data(data)
    assert kinds(r) == ["test-missing"] and r.blocking("train") == []


def test_missing_root(tmp_path):
    r = check_data(tmp_path / "nowhere")
    assert kinds(r) == ["missing-root"] and "invasive-dist synth" in r.problems[0].message


def test_format_lists_every_problem_with_its_file(data):
    (data / "train" / "3.jpg").unlink()
    (data / "train" / "4.jpg").write_bytes(b"")
    text = check_data(data).format()
    assert "FAILED: 2 error(s), 0 warning(s)" in text
    lines = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2 and any("3.jpg" in x for x in lines) and any("4.jpg" in x for x in lines)
    assert "data.on_bad_file=skip" in text


# ----------------------------------------------------------------------------------------------
# The cache.


def test_cache_is_used_while_files_are_unchanged_and_invalidated_when_they_change(
    data, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    first = cached_check(data, "train_labels.csv", cache)
    assert first.ok and not first.from_cache
    assert len(list(cache.glob("*.json"))) == 1

    calls = []

    def exploding_decoder(path, *a, **k):
        calls.append(path)
        return [Problem("corrupt", str(path), f"{path}: decoder was called", True)]

    monkeypatch.setattr(check_mod, "inspect_image", exploding_decoder)
    second = cached_check(data, "train_labels.csv", cache)
    assert second.ok and second.from_cache and calls == []
    assert second.to_json() | {"from_cache": False} == first.to_json() | {"from_cache": False}

    img = data / "train" / "4.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same size
    third = cached_check(data, "train_labels.csv", cache)
    assert not third.from_cache and not third.ok and calls

    calls.clear()
    assert cached_check(data, "train_labels.csv", cache).from_cache and calls == []
    with open(img, "ab") as f:  # grows, and mtime may not change within its resolution
        f.write(b"\0")
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not cached_check(data, "train_labels.csv", cache).from_cache and calls


def test_cache_depends_on_options_and_label_file(data, tmp_path):
    cache = tmp_path / "cache"
    (data / "train" / "2.jpg").write_bytes(jpeg_bytes("L"))
    assert cached_check(data, "train_labels.csv", cache).ok
    strict = cached_check(data, "train_labels.csv", cache, grayscale_cmyk="error")
    assert not strict.from_cache and not strict.ok
    (data / "train_labels.csv").write_text(labels_text(data) + "11,0\r\n")
    r = cached_check(data, "train_labels.csv", cache)
    assert not r.from_cache and "missing-file" in kinds(r)


def test_corrupt_cache_file_is_ignored(data, tmp_path):
    cache = tmp_path / "cache"
    cached_check(data, "train_labels.csv", cache)
    for f in cache.glob("*.json"):
        f.write_text("{not json")
    r = cached_check(data, "train_labels.csv", cache)
    assert r.ok and not r.from_cache
    assert cached_check(data, "train_labels.csv", cache).from_cache  # rewritten


# ----------------------------------------------------------------------------------------------
# Fuzz: garbage never crashes the check or the decoder.


def fuzz_cases(seed: int = 0, n: int = 50) -> list[bytes]:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    sources = [buf.getvalue()]
    if (REAL / "train" / "1.jpg").is_file():
        sources.append((REAL / "train" / "1.jpg").read_bytes())
    cases = [b""]  # an empty file first: the easiest one to get wrong
    for i in range(1, n):
        src = sources[i % len(sources)]
        kind = i % 5
        if kind == 0:  # random bytes
            cases.append(rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes())
        elif kind == 1:  # truncated anywhere
            cases.append(src[: int(rng.integers(0, len(src)))])
        elif kind == 2:  # truncated in the headers
            cases.append(src[: int(rng.integers(2, 700))])
        elif kind == 3:  # flipped bytes
            a = np.frombuffer(src, dtype=np.uint8).copy()
            idx = rng.integers(2, len(a), int(rng.integers(1, 30)))
            a[idx] = rng.integers(0, 256, len(idx))
            cases.append(a.tobytes())
        else:  # a JPEG start, then random bytes
            tail = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
            cases.append(src[: int(rng.integers(2, 200))] + tail)
    return cases


def test_fuzzed_files_become_problems_or_images_never_crashes(tmp_path):
    cases = fuzz_cases()
    root = tmp_path / "fuzz"
    (root / "train").mkdir(parents=True)
    names = [str(i) for i in range(1, len(cases) + 1)]
    for name, content in zip(names, cases):
        (root / "train" / f"{name}.jpg").write_bytes(content)
    (root / "train_labels.csv").write_text("name,invasive\r\n" + "".join(f"{n},0\r\n" for n in names))
    r = check_data(root)  # must not raise
    fatal = {p.path_or_name: p for p in r.problems if p.fatal and not p.kind.startswith("test-")}
    assert r.bad_names == set(fatal)
    assert len(fatal) > len(cases) // 2  # most of this garbage is unusable

    for name in names:
        path = root / "train" / f"{name}.jpg"
        if name in fatal:
            assert str(path) in fatal[name].message
        try:
            img = decode_rgb(path)
        except UserError as e:
            assert str(path) in str(e)
            continue
        # Anything the decoder accepts is a real RGB image.
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and min(img.shape[1:]) > 0


def test_decode_rgb_names_missing_and_empty_files(tmp_path):
    for path, content in ((tmp_path / "missing.jpg", None), (tmp_path / "empty.jpg", b"")):
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(UserError, match=path.name):
            decode_rgb(path)
