"""Exploratory data analysis as files: the class balance, sample images of each class, a summary.

    summary = run_eda(Path("data/kaggle"), Path("runs/eda"))    # or `invasive-dist eda --data ... --out ...`

writes to ``out_dir``:

- ``class_balance.png``: bar chart of invasive (1) vs not invasive (0) with the counts;
- ``samples_invasive.png``, ``samples_not_invasive.png``: ``per_class`` thumbnails of each class,
  drawn by ``seed``, each captioned with its name (shown upright: EXIF orientation applied);
- ``summary.json``: counts per class, train/test image counts, image sizes seen (``"1154x866": n``,
  from the JPEG headers only) and file sizes in bytes (min/mean/max) for train and test.

Plots are drawn with Pillow (plots.py; no plotting dependency). Reading the sizes of the 3,826
competition images touches only their headers; decoding is limited to the thumbnails
(``Image.draft`` lets libjpeg decode them at 1/2 to 1/8 scale).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .data.kaggle import read_labels
from .files import write_json
from .plots import font, image_grid, save_png, text_size, vertical_text

CLASS_NAMES = {1: "invasive", 0: "not invasive"}
COLOURS = {1: (143, 110, 212), 0: (76, 140, 74)}


def _jpg_files(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if e.name.endswith(".jpg") and e.is_file())
    except OSError:
        return []


def _header_stats(files: list[Path]) -> tuple[Counter, dict[str, float | int | None], list[str]]:
    """Image sizes from the headers (no decode), byte sizes, and the files whose header failed."""
    sizes: Counter = Counter()
    nbytes: list[int] = []
    unreadable: list[str] = []
    for p in files:
        try:
            nbytes.append(p.stat().st_size)
            with Image.open(p) as im:
                w, h = im.size
            sizes[f"{w}x{h}"] += 1
        except Exception:  # EDA reports, it does not judge: check-data says what is wrong
            unreadable.append(str(p))
    stats: dict[str, float | int | None] = {
        "min": min(nbytes) if nbytes else None,
        "mean": round(float(np.mean(nbytes)), 1) if nbytes else None,
        "max": max(nbytes) if nbytes else None,
    }
    return sizes, stats, unreadable


def class_balance_png(counts: dict[int, int], path: Path, title: str) -> None:
    """Bar chart of the two classes with counts, axes, tick labels and a title."""
    w, h = 640, 480
    left, right, top, bottom = 90, 30, 60, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f_title, f_label, f_tick = font(20), font(16), font(13)

    tw, _ = text_size(d, title, f_title)
    d.text(((w - tw) // 2, 18), title, fill="black", font=f_title)
    x0, y0, x1, y1 = left, top, w - right, h - bottom  # plot area
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=2)

    peak = max(max(counts.values()), 1)
    step = _nice_step(peak)
    ymax = step * (-(-peak // step)) if peak % step else peak + step
    for v in range(0, ymax + 1, step):
        y = y1 - (y1 - y0) * v / ymax
        d.line([(x0 - 5, y), (x0, y)], fill="black")
        d.line([(x0 + 1, y), (x1, y)], fill=(225, 225, 225))
        lw, lh = text_size(d, str(v), f_tick)
        d.text((x0 - 9 - lw, y - lh / 2 - 2), str(v), fill="black", font=f_tick)

    total = sum(counts.values()) or 1
    slot = (x1 - x0) / 2
    for i, cls in enumerate((1, 0)):
        n = counts.get(cls, 0)
        bx0, bx1 = x0 + slot * i + slot * 0.2, x0 + slot * (i + 1) - slot * 0.2
        by = y1 - (y1 - y0) * n / ymax
        d.rectangle([bx0, by, bx1, y1 - 1], fill=COLOURS[cls], outline="black")
        value = f"{n} ({100 * n / total:.1f}%)"
        vw, vh = text_size(d, value, f_label)
        d.text(((bx0 + bx1 - vw) / 2, by - vh - 8), value, fill="black", font=f_label)
        name = f"{CLASS_NAMES[cls]} ({cls})"
        nw, _ = text_size(d, name, f_label)
        d.text(((bx0 + bx1 - nw) / 2, y1 + 8), name, fill="black", font=f_label)

    xl = "class (column 'invasive')"
    xw, _ = text_size(d, xl, f_label)
    d.text(((x0 + x1 - xw) / 2, h - 30), xl, fill="black", font=f_label)
    ylab = vertical_text("number of train images", f_label)
    img.paste(ylab, (12, int((y0 + y1 - ylab.height) / 2)))
    save_png(img, path)


def _nice_step(peak: int) -> int:
    """A round tick step giving about 5-10 ticks up to ``peak``."""
    raw = max(peak / 6, 1)
    mag = 10 ** int(np.floor(np.log10(raw)))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return int(m * mag)
    return int(10 * mag)


def run_eda(
    data_root: Path,
    out_dir: Path,
    labels_csv: str = "train_labels.csv",
    per_class: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the EDA files (see the module docstring) to ``out_dir`` and return the summary."""
    data_root, out_dir = Path(data_root), Path(out_dir)
    labels = read_labels(data_root / labels_csv)  # UserError naming the file if it is unusable
    out_dir.mkdir(parents=True, exist_ok=True)
    names = labels["name"].tolist()
    values = labels["invasive"].to_numpy()
    counts = {1: int((values == 1).sum()), 0: int((values == 0).sum())}

    class_balance_png(
        counts, out_dir / "class_balance.png", f"Class balance of {labels_csv} ({len(names)} images)"
    )

    rng = np.random.default_rng(seed)
    train_dir = data_root / "train"
    for cls, fname in ((1, "samples_invasive.png"), (0, "samples_not_invasive.png")):
        # Only images that exist can be shown; draw from those, in label-file order, by seed.
        members = [n for n, v in zip(names, values) if v == cls and (train_dir / f"{n}.jpg").is_file()]
        pick = sorted(rng.choice(len(members), size=min(per_class, len(members)), replace=False).tolist())
        shown = [(train_dir / f"{members[i]}.jpg", f"{members[i]}.jpg") for i in pick]
        title = f"{CLASS_NAMES[cls]} (label {cls}): {len(shown)} of {counts[cls]} images, seed {seed}"
        image_grid(shown, out_dir / fname, title, empty="no images of this class")

    train_files, test_files = _jpg_files(train_dir), _jpg_files(data_root / "test")
    train_sizes, train_bytes, train_bad = _header_stats(train_files)
    test_sizes, test_bytes, test_bad = _header_stats(test_files)
    summary: dict[str, Any] = {
        "data_root": str(data_root),
        "labels_csv": labels_csv,
        "n_label_rows": len(names),
        "classes": {"invasive": counts[1], "not_invasive": counts[0]},
        "positive_fraction": round(counts[1] / len(names), 4) if names else None,
        "n_train_images": len(train_files),
        "n_test_images": len(test_files),
        "image_sizes": dict((train_sizes + test_sizes).most_common()),  # "WxH": count, train and test
        "image_sizes_train": dict(train_sizes.most_common()),
        "image_sizes_test": dict(test_sizes.most_common()),
        "bytes": {"train": train_bytes, "test": test_bytes},
        "unreadable_headers": train_bad + test_bad,  # run check-data for what is wrong with them
        "files": ["class_balance.png", "samples_invasive.png", "samples_not_invasive.png", "summary.json"],
    }
    write_json(out_dir / "summary.json", summary)
    return summary
