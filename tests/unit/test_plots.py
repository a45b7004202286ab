"""Pillow figures: the one captioned image grid (EDA samples, misclassified images) puts each image in
its own tile, row by row, and ``analyze_predictions`` fills it with the most confidently wrong ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from invasive_dist.analysis import WRONG, analyze_predictions
from invasive_dist.plots import THUMB, image_grid

# Solid colours far apart (>= 35 per channel from each other and from the red frame), one per image.
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _runs(mask: np.ndarray, min_len: int) -> int:
    """Runs of True at least ``min_len`` long in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int(((ends - starts) >= min_len).sum())


def grid_shape(path: Path, thumb: tuple[int, int] = THUMB) -> tuple[int, int]:
    """(rows, columns) of thumbnail tiles in a grid PNG: the most non-white runs at least half a
    thumbnail long along any column (rows) and any row (columns). Caption and title letters are
    far shorter than half a thumbnail (112 x 84 px)."""
    ink = (decode(path) != 255).any(axis=2)
    cols = max(_runs(r, thumb[0] // 2) for r in ink)
    rows = max(_runs(c, thumb[1] // 2) for c in ink.T)
    return rows, cols


def colour_box(img: np.ndarray, colour: tuple[int, int, int], tol: int = 8) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the pixels within ``tol`` of ``colour``; JPEG moves a solid
    colour by a few levels."""
    ys, xs = np.nonzero((np.abs(img - np.array(colour)) <= tol).all(axis=2))
    assert len(xs), f"colour {colour} not in the image"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def solid_images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, colour in zip(names, COLOURS):
        p = folder / f"{name}.jpg"
        Image.new("RGB", (96, 72), colour).save(p, quality=95)  # 4:3, so it fills the thumbnail box
        paths.append(p)
    return paths


def test_image_grid_puts_each_image_in_its_own_tile_row_by_row(tmp_path):
    paths = solid_images(tmp_path / "img", [str(i) for i in range(6)])
    out = image_grid(
        [(p, (p.name, "second line")) for p in paths], tmp_path / "grid.png", "six images", cols=4
    )
    assert grid_shape(out) == (2, 4)  # 6 tiles, 4 per row
    img = decode(out)
    boxes = [colour_box(img, c) for c in COLOURS]
    for x0, y0, x1, y1 in boxes:
        assert (x1 - x0, y1 - y0) == THUMB  # a whole thumbnail, nothing else of that colour
    tops = [b[1] for b in boxes]
    assert len(set(tops[:4])) == 1 and tops[4] == tops[5] > boxes[0][3]  # second row below the first
    lefts = [b[0] for b in boxes]
    assert lefts[:4] == sorted(set(lefts[:4])) and lefts[4:] == lefts[:2]  # row-major, columns aligned
    x0, _, x1, y1 = boxes[0]
    assert (img[y1 : y1 + 40, x0:x1] != 255).any()  # the caption under the thumbnail


def test_image_grid_without_items_says_so(tmp_path):
    out = image_grid([], tmp_path / "none.png", "nothing to show", empty="no images of this class")
    assert grid_shape(out) == (0, 0)
    w, h = decode(out).shape[1::-1]
    assert w >= THUMB[0] and h > THUMB[1]  # room for the message where the first tile would be


def test_analysis_grids_the_most_confidently_wrong_images_framed(tmp_path):
    names = [str(i) for i in range(1, 7)]
    solid_images(tmp_path / "data" / "train", names)
    # Wrong at 0.5: 2 (|1 - 0.05| = 0.95), 4 (0.8), 5 (0.6); 1, 3 and 6 are right.
    oof = pd.DataFrame(
        {
            "name": names,
            "label": [1, 1, 0, 0, 1, 0],
            "fold": [0, 0, 0, 1, 1, 1],
            "probability": [0.9, 0.05, 0.2, 0.8, 0.4, 0.1],
        }
    )
    s = analyze_predictions(oof, tmp_path / "data", tmp_path / "a", n_wrong=2)
    assert [w["name"] for w in s["most_confidently_wrong"]] == ["2", "4"] and s["n_wrong"] == 3
    assert json.loads((tmp_path / "a" / "analysis.json").read_text()) == s
    out = tmp_path / "a" / "wrong.png"
    assert grid_shape(out) == (1, 2)
    img = decode(out)
    first, second = colour_box(img, COLOURS[1]), colour_box(img, COLOURS[3])  # images 2 and 4
    assert first[0] < second[0] and first[1] == second[1]  # most confident first
    x0, y0, x1, y1 = first
    frame = img[y0 - 2, x0:x1]  # the red frame just above the thumbnail
    assert (np.abs(frame - np.array(WRONG)) <= 2).all()
    for name in ("roc.png", "confusion.png"):
        assert min(decode(tmp_path / "a" / name).shape[:2]) > 100
