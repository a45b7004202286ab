"""Figures drawn with Pillow (no plotting library): ROC curves, confusion matrix, captioned image
grids, and the helpers they share (font, text size, upright thumbnails, atomic PNG writes).

    draw_roc(roc_curves_for(oof), run_dir / "roc.png")
    image_grid([(root / "train" / "12.jpg", "12.jpg"), ...], out / "samples.png", title="invasive")

Used by ``analyze`` (analysis.py: ROC, confusion, the misclassified images), ``cv`` (the
out-of-fold ROC) and ``eda`` (class balance, sample images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .files import atomic_write
from .metrics import roc_auc, roc_curve

Color = str | tuple[int, int, int]  # a Pillow colour: a name or RGB
THUMB = (224, 168)  # grid thumbnail box: the competition's 4:3 aspect (1154x866 images)
FOLD_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def save_png(img: Image.Image, path: Path) -> Path:
    """Write a PNG atomically: concurrent writers never leave half a file."""
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):  # older Pillow, or no FreeType: the bitmap font
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def vertical_text(text: str, font, fill: Color = "black") -> Image.Image:
    """``text`` on a white strip turned 90 degrees (read bottom to top): a y-axis label to paste."""
    _, _, w, h = font.getbbox(text)  # extents from the origin, top-left anchored
    strip = Image.new("RGB", (w + 4, h + 4), "white")
    ImageDraw.Draw(strip).text((2, 2), text, fill=fill, font=font)
    return strip.rotate(90, expand=True)


def dashed(draw: ImageDraw.ImageDraw, p0, p1, fill, dash: int = 6) -> None:
    (x0, y0), (x1, y1) = p0, p1
    n = max(1, int(math.hypot(x1 - x0, y1 - y0) // dash))
    for i in range(0, n, 2):
        a, b = i / n, min(i + 1, n) / n
        draw.line(
            [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=fill
        )


def draw_roc(curves: list[dict], path: Path, title: str = "ROC") -> Path:
    """``curves``: dicts with fpr, tpr, label, and optional color (RGB) and width. Last drawn on top."""
    W, H, left, right, top, bottom = 560, 560, 64, 24, 44, 56
    pw, ph = W - left - right, H - top - bottom
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs = font(15), font(12)

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return left + fx * pw, top + (1 - fy) * ph

    for t in np.linspace(0, 1, 6):
        d.line([xy(t, 0), xy(t, 1)], fill=(232, 232, 232))
        d.line([xy(0, t), xy(1, t)], fill=(232, 232, 232))
        d.text((xy(t, 0)[0], top + ph + 6), f"{t:.1f}", fill="black", font=fs, anchor="mt")
        d.text((left - 6, xy(0, t)[1]), f"{t:.1f}", fill="black", font=fs, anchor="rm")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    dashed(d, xy(0, 0), xy(1, 1), fill=(150, 150, 150))
    for c in curves:
        pts = [xy(a, b) for a, b in zip(c["fpr"], c["tpr"])]
        d.line(pts, fill=tuple(c.get("color", (0, 0, 0))), width=int(c.get("width", 2)), joint="curve")
    d.text((W / 2, 12), title, fill="black", font=f, anchor="mt")
    d.text((left + pw / 2, H - 8), "false positive rate", fill="black", font=fs, anchor="mb")
    ylab = vertical_text("true positive rate", fs)
    img.paste(ylab, (4, top + (ph - ylab.height) // 2))
    # Legend, bottom right inside the plot.
    lines = [(c["label"], tuple(c.get("color", (0, 0, 0)))) for c in curves]
    lh = 18
    y0 = top + ph - 10 - lh * len(lines)
    x0 = left + pw * 0.42
    d.rectangle([x0 - 8, y0 - 6, left + pw - 6, top + ph - 6], fill="white", outline=(200, 200, 200))
    for i, (text, color) in enumerate(lines):
        y = y0 + i * lh + lh / 2
        d.line([(x0, y), (x0 + 22, y)], fill=color, width=3)
        d.text((x0 + 28, y), text, fill="black", font=fs, anchor="lm")
    return save_png(img, path)


def draw_confusion(counts: dict[str, int], threshold: float, path: Path, title: str = "") -> Path:
    cell, left, top = 170, 130, 104
    W, H = left + 2 * cell + 30, top + 2 * cell + 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fb, fs = font(15), font(24), font(13)
    grid = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    for r in range(2):
        row_total = max(1, sum(grid[r]))
        for c in range(2):
            frac = grid[r][c] / row_total
            shade = (int(255 - 200 * frac), int(255 - 140 * frac), 255)
            x, y = left + c * cell, top + r * cell
            d.rectangle([x, y, x + cell, y + cell], fill=shade, outline="black")
            ink = "white" if frac > 0.6 else "black"
            d.text((x + cell / 2, y + cell / 2 - 12), str(grid[r][c]), fill=ink, font=fb, anchor="mm")
            d.text(
                (x + cell / 2, y + cell / 2 + 18), f"{100 * frac:.1f}% of row", fill=ink, font=fs, anchor="mm"
            )
    for i, name in enumerate(("0 (native)", "1 (invasive)")):
        d.text((left + i * cell + cell / 2, top - 8), name, fill="black", font=fs, anchor="mb")
        d.text((left - 8, top + i * cell + cell / 2), name, fill="black", font=fs, anchor="rm")
    d.text((left + cell, top - 28), "predicted", fill="black", font=f, anchor="mb")
    d.text((left - 8, top - 8), "true", fill="black", font=f, anchor="rb")
    n = sum(counts.values())
    tpr = counts["tp"] / max(1, counts["tp"] + counts["fn"])
    tnr = counts["tn"] / max(1, counts["tn"] + counts["fp"])
    acc = (counts["tp"] + counts["tn"]) / max(1, n)
    d.text((W / 2, 10), title or "confusion matrix", fill="black", font=f, anchor="mt")
    d.text(
        (W / 2, 32),
        f"threshold {threshold:.4g}: positive when p >= threshold",
        fill="black",
        font=fs,
        anchor="mt",
    )
    d.text(
        (W / 2, H - 24),
        f"accuracy {acc:.3f}   TPR {tpr:.3f}   TNR {tnr:.3f}   n {n}",
        fill="black",
        font=fs,
        anchor="mm",
    )
    return save_png(img, path)


def thumbnail(path: Path, size: tuple[int, int]) -> Image.Image:
    """The image upright (EXIF orientation applied) fitted into ``size``, up or down; a grey
    placeholder saying why when it cannot be shown."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", size)  # JPEG: decode at a reduced scale, much faster for 1154x866 files
            im = ImageOps.exif_transpose(im).convert("RGB")
            return ImageOps.contain(im, size)
    except Exception as e:  # a figure reports, it does not judge: check-data says what is wrong
        ph = Image.new("RGB", size, (200, 200, 200))
        why = "image not found" if isinstance(e, FileNotFoundError) else f"cannot show: {type(e).__name__}"
        ImageDraw.Draw(ph).text((size[0] / 2, size[1] / 2), why, fill="black", font=font(13), anchor="mm")
        return ph


def image_grid(
    items: Sequence[tuple[Path, str | Sequence[str]]],
    path: Path,
    title: str,
    *,
    cols: int = 4,
    thumb: tuple[int, int] = THUMB,
    caption_colors: Sequence[Color] = ("black",),
    frame: Color | None = None,
    empty: str = "no images",
) -> Path:
    """A titled grid of upright thumbnails, ``cols`` per row, each with its caption centred under it.

    ``items`` is [(image file, caption)]; a caption is one line or a sequence of lines, line i drawn
    in ``caption_colors[i]`` (the last colour for any further lines). ``frame`` outlines each
    thumbnail in that colour; ``empty`` is written instead when there are no items. The image is
    as wide as the title needs, at least. Used for the EDA samples and the misclassified images."""
    captions = [(c,) if isinstance(c, str) else tuple(c) for _, c in items]
    n = len(items)
    cols = max(1, min(cols, n))
    nrows = max(1, math.ceil(n / cols))
    tw, th = thumb
    pad, head, line = 10, 40, 17  # 17 px per 13 px caption line
    cap = 4 + line * max([1, *map(len, captions)])
    f, fs = font(15), font(13)
    W = max(pad + cols * (tw + pad), math.ceil(f.getlength(title)) + 2 * pad)
    H = head + nrows * (th + cap + pad) + pad
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((W / 2, 12), title, fill="black", font=f, anchor="mt")
    if n == 0:
        d.text((W / 2, head + th / 2), empty, fill="black", font=f, anchor="mm")
    for i, ((file, _), lines) in enumerate(zip(items, captions)):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), head + r * (th + cap + pad)
        im = thumbnail(Path(file), thumb)
        ox, oy = x + (tw - im.width) // 2, y + (th - im.height) // 2
        img.paste(im, (ox, oy))
        if frame is not None:
            d.rectangle([ox - 2, oy - 2, ox + im.width + 1, oy + im.height + 1], outline=frame, width=2)
        for k, text in enumerate(lines):
            color = caption_colors[min(k, len(caption_colors) - 1)]
            d.text((x + tw / 2, y + th + 4 + k * line), text, fill=color, font=fs, anchor="ma")
    return save_png(img, path)


def roc_curves_for(oof: pd.DataFrame) -> list[dict]:
    """Per-fold curves (thin, colored) when there are several folds, then the overall one (black)."""
    curves = []
    folds = sorted(oof["fold"].unique()) if "fold" in oof else []
    if len(folds) > 1:
        for i, k in enumerate(folds):
            part = oof[oof["fold"] == k]
            if part["label"].nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(part["label"], part["probability"])
            auc = roc_auc(part["label"].to_numpy(), part["probability"].to_numpy())
            curves.append(
                {
                    "fpr": fpr,
                    "tpr": tpr,
                    "label": f"fold {k}: AUC {auc:.4f}",
                    "color": FOLD_COLORS[i % 10],
                    "width": 1,
                }
            )
    fpr, tpr, _ = roc_curve(oof["label"], oof["probability"])
    auc = roc_auc(oof["label"].to_numpy(), oof["probability"].to_numpy())
    name = "out-of-fold" if len(folds) > 1 else "validation"
    curves.append({"fpr": fpr, "tpr": tpr, "label": f"{name}: AUC {auc:.4f}", "color": (0, 0, 0), "width": 3})
    return curves
