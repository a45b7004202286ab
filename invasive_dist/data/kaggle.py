"""The Kaggle layout: label file, image paths, stratified folds, test names.

    root/train/<name>.jpg      root/test/<name>.jpg
    root/train_labels.csv      name,invasive  (integers; the published file has CRLF endings)
    root/sample_submission.csv name,invasive  (the order the submission must keep)

``DataIndex`` is what every backend is fed: parallel lists of names, paths and labels (-1 for
test images). Positions in an index are the "sample indices" that batches carry.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError

LABEL_HEADER = ("name", "invasive")
UNLABELLED = -1


@dataclass
class DataIndex:
    """Parallel arrays: ``names[i]`` is stored at ``paths[i]`` with label ``labels[i]``."""

    names: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64, UNLABELLED for test images

    def __len__(self) -> int:
        return len(self.names)

    def concat(self, other: DataIndex) -> DataIndex:
        return DataIndex(
            self.names + other.names, self.paths + other.paths, np.concatenate([self.labels, other.labels])
        )

    def subset(self, positions: np.ndarray | list[int]) -> DataIndex:
        pos = np.asarray(positions, dtype=np.int64)
        return DataIndex(
            names=[self.names[i] for i in pos],
            paths=[self.paths[i] for i in pos],
            labels=self.labels[pos].copy(),
        )


@dataclass(frozen=True)
class RowProblem:
    kind: (
        str  # labels-unreadable, labels-empty, labels-header, labels-row, duplicate-name, bad-name, bad-label
    )
    key: str  # the file, or for bad-name the row's name
    message: str  # names the file and line and says what to do


@dataclass
class NameRows:
    names: list[str]  # names of the usable rows, in file order
    labels: list[int]  # their labels (0/1; -1 for the sample submission)
    bad_names: list[str]  # rows whose name is not an integer (kept in names for a label file)
    problems: list[RowProblem]
    values: list[str] = field(default_factory=list)  # the usable rows' second field, as written


def read_name_csv(path: Path, labelled: bool = True, checked: bool = True) -> NameRows:
    """:func:`parse_name_csv`, refusing: any problem of the file or of a row (header, field count,
    a label that is not 0/1, a duplicate name; for an unlabelled file also a name that is not an
    integer) is a UserError naming the file and line. A label file keeps its non-integer names:
    the data check marks them bad (refused, or left out with ``data.on_bad_file=skip``).
    ``checked``: the file is one ``check-data`` reads, so the error points there for the rest."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows = parse_name_csv(path, labelled)
    refused = [p for p in rows.problems if not (labelled and p.kind == "bad-name")]
    if refused:
        more = ""
        if len(refused) > 1:
            where = "run `invasive-dist check-data` for the list" if checked else "fix them too"
            more = f" ({len(refused) - 1} more; {where})"
        raise UserError(refused[0].message + more)
    return rows


def read_labels(path: Path) -> pd.DataFrame:
    """Label file -> DataFrame(name: str, invasive: int), by the parser ``check-data`` uses;
    refused as :func:`read_name_csv` says."""
    rows = read_name_csv(Path(path), labelled=True)
    return pd.DataFrame(
        {"name": pd.Series(rows.names, dtype=object), "invasive": np.asarray(rows.labels, np.int64)}
    )


def parse_name_csv(path: Path, labelled: bool = True) -> NameRows:
    """Parse a ``name,invasive`` file (the label file, or with ``labelled=False`` the sample
    submission) into its usable rows and every problem found, each naming the file and line.
    Never raises: :func:`read_name_csv` (and so training and prediction) refuses on the problems,
    ``check-data`` reports them."""
    what = "label file" if labelled else "sample submission"
    fix = (
        "it must be 'name,invasive' with one row per train image, as the Kaggle train_labels.csv"
        if labelled
        else "it must be 'name,invasive' with one row per test image, as the Kaggle sample_submission.csv"
    )

    problems: list[RowProblem] = []

    def add(kind: str, message: str) -> None:
        problems.append(RowProblem(kind, str(path), message))

    try:
        raw = path.read_bytes()
    except OSError as e:
        add("labels-unreadable", f"{path}: cannot read the {what} ({e.strerror or e}); check its permissions")
        return NameRows([], [], [], problems)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        add("labels-unreadable", f"{path}: the {what} is not UTF-8 text; {fix}")
        return NameRows([], [], [], problems)
    if "\x00" in text:
        add("labels-unreadable", f"{path}: the {what} contains NUL bytes (binary data?); {fix}")
        return NameRows([], [], [], problems)
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)]
    except csv.Error as e:
        add("labels-unreadable", f"{path}: the {what} is not a readable CSV ({e}); {fix}")
        return NameRows([], [], [], problems)
    if not rows:
        add("labels-empty", f"{path}: the {what} is empty; {fix}")
        return NameRows([], [], [], problems)
    header = [c.strip() for c in rows[0]]
    if tuple(header) != LABEL_HEADER:
        add("labels-header", f"{path}: header is {','.join(rows[0])!r}, expected 'name,invasive'; {fix}")
        return NameRows([], [], [], problems)
    if len(rows) == 1:
        add("labels-empty", f"{path}: the {what} has a header but no rows; {fix}")
        return NameRows([], [], [], problems)

    names: list[str] = []
    labels: list[int] = []
    bad_names: list[str] = []
    values: list[str] = []
    seen: dict[str, int] = {}
    # Line numbers assume one row per line (true for these files; blank lines are skipped by csv).
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip()]
    for i, row in enumerate(rows[1:], start=1):
        line = lines[i] if i < len(lines) else i + 1
        where = f"{path} line {line}"
        if len(row) != 2:
            add(
                "labels-row",
                f"{where}: {','.join(row)!r} has {len(row)} field(s), expected 2 (name,invasive); fix the row",
            )
            continue
        name, value = row[0].strip(), row[1].strip()
        if name in seen:
            add(
                "duplicate-name",
                f"{where}: name {name!r} appears more than once (already on line {seen[name]}); "
                "keep one row per image",
            )
            continue
        seen[name] = line
        if not (name.isascii() and name.isdigit()):
            message = (
                f"{where}: name {name!r} is not an integer (Kaggle names are 1, 2, ...); "
                "rename the image and the row, or remove the row"
            )
            problems.append(RowProblem("bad-name", name, message))
            if not labelled:
                continue
            bad_names.append(name)
        if labelled and value not in ("0", "1"):
            add(
                "bad-label",
                f"{where}: image {name!r} has label {value!r}; labels must be 0 or 1, fix row {line}",
            )
            continue
        names.append(name)
        labels.append(int(value) if labelled else -1)
        values.append(value)
    return NameRows(names, labels, bad_names, problems, values)


def train_index(root: str | Path, labels_csv: str = "train_labels.csv", limit: int = 0) -> DataIndex:
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data folder {root} does not exist; create one with `invasive-dist synth --out {root}` "
            "or point data.root at the Kaggle data"
        )
    df = read_labels(root / labels_csv)
    if limit:
        df = df.iloc[:limit]
    return DataIndex(
        names=list(df["name"]),
        paths=[root / "train" / f"{n}.jpg" for n in df["name"]],
        labels=df["invasive"].to_numpy(dtype=np.int64),
    )


def name_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def test_index(root: str | Path) -> DataIndex:
    """Test images in the sample submission's order, or sorted from test/ when it is absent.

    The sample submission is read by the parser ``check-data`` uses (:func:`read_name_csv`): a
    row it reports is a UserError here, naming the file and line."""
    root = Path(root)
    sub = root / "sample_submission.csv"
    if sub.is_file():
        names = read_name_csv(sub, labelled=False).names
    elif (root / "test").is_dir():
        names = sorted((p.stem for p in (root / "test").glob("*.jpg")), key=name_key)
    else:
        raise UserError(f"{root}: neither sample_submission.csv nor a test/ folder was found")
    if not names:
        raise UserError(f"{root}: no test images listed")
    return DataIndex(
        names=names,
        paths=[root / "test" / f"{n}.jpg" for n in names],
        labels=np.full(len(names), UNLABELLED, dtype=np.int64),
    )


def pseudo_index(root: Path, csv: Path) -> DataIndex:
    """Pseudo-labelled test images: ``csv`` holds name,invasive rows naming files in root/test/."""
    df = read_labels(csv)
    paths = [Path(root) / "test" / f"{n}.jpg" for n in df["name"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{csv}: {len(missing)} pseudo-labelled image(s) not found, e.g. {missing[0]}")
    return DataIndex(
        names=[f"test/{n}" for n in df["name"]], paths=paths, labels=df["invasive"].to_numpy(np.int64)
    )


test_index.__test__ = False  # not a pytest test, despite the name


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per sample: each class is shuffled by ``seed`` and dealt round-robin into folds,
    so every fold holds the class balance to within one image per class."""
    labels = np.asarray(labels)
    if len(labels) < n_folds:
        raise UserError(f"{len(labels)} labelled images cannot be split into {n_folds} folds")
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        # Continue the round-robin where the previous class stopped so fold sizes stay balanced.
        folds[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)
    return folds


def split(index: DataIndex, n_folds: int, fold: int, seed: int) -> tuple[DataIndex, DataIndex]:
    """(train, validation) where validation is fold ``fold`` of the stratified split."""
    folds = stratified_folds(index.labels, n_folds, seed)
    return index.subset(np.flatnonzero(folds != fold)), index.subset(np.flatnonzero(folds == fold))
