"""The Kaggle layout: label file, image paths, stratified folds, test names.

    root/train/<name>.jpg      root/test/<name>.jpg
    root/train_labels.csv      name,invasive  (integers; the published file has CRLF endings)
    root/sample_submission.csv name,invasive  (the order the submission must keep)

``DataIndex`` is what every backend is fed: parallel lists of names, paths and labels (-1 for
test images). Positions in an index are the "sample indices" that batches carry.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
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


def read_csv_text(path: Path) -> pd.DataFrame:
    """Read a ``name,invasive`` CSV (CRLF or LF) with names kept as strings."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    if not raw.strip():
        raise UserError(f"{path}: the file is empty; expected a header 'name,invasive' and rows")
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    if tuple(df.columns) != LABEL_HEADER:
        raise UserError(
            f"{path}: header is {','.join(df.columns)!r}; expected 'name,invasive' "
            "(the Kaggle train_labels.csv / sample_submission.csv format)"
        )
    return df.apply(lambda col: col.str.strip())


def read_labels(path: Path) -> pd.DataFrame:
    """Label file -> DataFrame(name: str, invasive: int). Rows that are not 0/1 are an error."""
    df = read_csv_text(path)
    bad = df[~df["invasive"].isin(["0", "1"])]
    if len(bad):
        row = bad.index[0]
        raise UserError(
            f"{path}: row {row + 2} (name {bad.iloc[0]['name']!r}) has label "
            f"{bad.iloc[0]['invasive']!r}; labels must be 0 or 1 "
            f"({len(bad)} such row(s); run `invasive-dist check-data` for the full list)"
        )
    dup = df[df["name"].duplicated()]
    if len(dup):
        raise UserError(
            f"{path}: name {dup.iloc[0]['name']!r} appears more than once "
            f"({len(dup)} duplicate row(s)); each image must have one label"
        )
    return pd.DataFrame({"name": df["name"], "invasive": df["invasive"].astype(np.int64)})


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


def _name_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def test_index(root: str | Path) -> DataIndex:
    """Test images in the sample submission's order, or sorted from test/ when it is absent."""
    root = Path(root)
    sub = root / "sample_submission.csv"
    if sub.is_file():
        names = list(read_csv_text(sub)["name"])
    elif (root / "test").is_dir():
        names = sorted((p.stem for p in (root / "test").glob("*.jpg")), key=_name_key)
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
