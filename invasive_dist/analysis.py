"""Error analysis of a finished run or CV directory: ROC curve, confusion matrix, worst images.

    invasive-dist analyze --run runs/r50                      # a CV directory: uses its oof.csv
    invasive-dist analyze --run runs/demo --threshold youden  # one run: scores its validation fold first

Writes into ``RUN/analysis/`` (or ``--out``):

    roc.png         ROC curve of the validation predictions (a CV directory: the out-of-fold curve
                    in black, one thin curve per fold), AUC in the legend
    confusion.png   2x2 confusion matrix at the threshold (default 0.5; ``youden`` picks the one
                    that maximises Youden's J = TPR - FPR on these predictions, an optimistic choice)
    wrong.png       the most confidently wrong validation images (misclassified at the threshold,
                    sorted by |label - probability|), captioned with name, label and probability
    analysis.json   AUC, threshold, counts, and the names of the images in wrong.png

A single run's validation predictions are computed once (best checkpoint, EMA weights if present,
``predict.tta`` of its config) and kept in ``RUN/oof.csv``, the same file ``invasive-dist cv``
writes for each fold. Plots are drawn with Pillow; no plotting library is needed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError
from .metrics import roc_auc

FOLD_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Numbers


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, from (0, 0) at threshold +inf down to
    (1, 1); a sample is called positive when its score is >= the threshold."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(
            f"a ROC curve needs both classes; these predictions have {n_pos} positive, {n_neg} negative"
        )
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises TPR - FPR (the highest such threshold on ties)."""
    fpr, tpr, thr = roc_curve(labels, scores)
    j = tpr[1:] - fpr[1:]
    return float(thr[1:][int(np.argmax(j))])


def confusion(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    return {
        "tn": int((~y & ~pred).sum()),
        "fp": int((~y & pred).sum()),
        "fn": int((y & ~pred).sum()),
        "tp": int((y & pred).sum()),
    }


# ----------------------------------------------------------------------------------------------
# Drawing with Pillow


def _save(img: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (temp file, then rename): concurrent writers never leave half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _dashed(draw: ImageDraw.ImageDraw, p0, p1, fill, dash: int = 6) -> None:
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
    f, fs = _font(15), _font(12)

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return left + fx * pw, top + (1 - fy) * ph

    for t in np.linspace(0, 1, 6):
        d.line([xy(t, 0), xy(t, 1)], fill=(232, 232, 232))
        d.line([xy(0, t), xy(1, t)], fill=(232, 232, 232))
        d.text((xy(t, 0)[0], top + ph + 6), f"{t:.1f}", fill="black", font=fs, anchor="mt")
        d.text((left - 6, xy(0, t)[1]), f"{t:.1f}", fill="black", font=fs, anchor="rm")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    _dashed(d, xy(0, 0), xy(1, 1), fill=(150, 150, 150))
    for c in curves:
        pts = [xy(a, b) for a, b in zip(c["fpr"], c["tpr"])]
        d.line(pts, fill=tuple(c.get("color", (0, 0, 0))), width=int(c.get("width", 2)), joint="curve")
    d.text((W / 2, 12), title, fill="black", font=f, anchor="mt")
    d.text((left + pw / 2, H - 8), "false positive rate", fill="black", font=fs, anchor="mb")
    ylab = Image.new("RGB", (ph, 18), "white")
    ImageDraw.Draw(ylab).text((ph / 2, 9), "true positive rate", fill="black", font=fs, anchor="mm")
    img.paste(ylab.rotate(90, expand=True), (4, top))
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
    return _save(img, path)


def draw_confusion(counts: dict[str, int], threshold: float, path: Path, title: str = "") -> Path:
    cell, left, top = 170, 130, 104
    W, H = left + 2 * cell + 30, top + 2 * cell + 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fb, fs = _font(15), _font(24), _font(13)
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
    return _save(img, path)


def _thumbnail(path: Path, size: tuple[int, int]) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.draft("RGB", size)  # JPEG: decode at a reduced scale, much faster for 1154x866 files
            im = ImageOps.exif_transpose(im).convert("RGB")
            return ImageOps.contain(im, size)  # fit the cell, up or down
    except (OSError, ValueError):
        ph = Image.new("RGB", size, (200, 200, 200))
        ImageDraw.Draw(ph).text(
            (size[0] / 2, size[1] / 2), "image not found", fill="black", font=_font(13), anchor="mm"
        )
        return ph


def draw_wrong_grid(rows: pd.DataFrame, image_root: Path, path: Path, title: str, cols: int = 4) -> Path:
    """Thumbnails of ``rows`` (name, label, probability[, fold]) with captions under each."""
    tw, th, cap, pad, head = 220, 165, 40, 10, 40
    n = len(rows)
    cols = max(1, min(cols, n))
    nrows = max(1, math.ceil(n / cols))
    W = pad + cols * (tw + pad)
    H = head + nrows * (th + cap + pad) + pad
    img = Image.new("RGB", (max(W, 420), H), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(15), _font(13)
    d.text((img.width / 2, 12), title, fill="black", font=f, anchor="mt")
    if n == 0:
        d.text((img.width / 2, head + th / 2), "no misclassified images", fill="black", font=f, anchor="mm")
    for i, row in enumerate(rows.itertuples(index=False)):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), head + r * (th + cap + pad)
        thumb = _thumbnail(Path(image_root) / "train" / f"{row.name}.jpg", (tw, th))
        ox, oy = x + (tw - thumb.width) // 2, y + (th - thumb.height) // 2
        img.paste(thumb, (ox, oy))
        d.rectangle(
            [ox - 2, oy - 2, ox + thumb.width + 1, oy + thumb.height + 1], outline=(214, 39, 40), width=2
        )
        fold = f"  fold {int(row.fold)}" if hasattr(row, "fold") else ""
        d.text((x, y + th + 4), f"{row.name}   label {int(row.label)}{fold}", fill="black", font=fs)
        d.text((x, y + th + 21), f"p(invasive) = {row.probability:.4f}", fill=(214, 39, 40), font=fs)
    return _save(img, path)


# ----------------------------------------------------------------------------------------------
# Putting it together


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


def parse_threshold(text: str | float) -> str | float:
    if isinstance(text, (int, float)):
        return float(text)
    if text == "youden":
        return text
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--threshold {text!r}: expected a number in [0, 1] or 'youden'") from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--threshold {value}: must be in [0, 1]")
    return value


def analyze_predictions(
    oof: pd.DataFrame,
    image_root: Path,
    out_dir: Path,
    threshold: str | float = 0.5,
    n_wrong: int = 16,
    title: str = "",
) -> dict:
    """Write roc.png, confusion.png, wrong.png and analysis.json for rows of name,label,probability[,fold]."""
    out_dir = Path(out_dir)
    labels, probs = oof["label"].to_numpy(), oof["probability"].to_numpy()
    thr = parse_threshold(threshold)
    thr_value = youden_threshold(labels, probs) if thr == "youden" else float(thr)
    auc = roc_auc(labels, probs)
    draw_roc(roc_curves_for(oof), out_dir / "roc.png", title=f"ROC {title}".strip())
    counts = confusion(labels, probs, thr_value)
    how = "Youden's J" if thr == "youden" else "fixed"
    draw_confusion(counts, thr_value, out_dir / "confusion.png", title=f"{title} ({how} threshold)".strip())
    wrong = oof[(probs >= thr_value) != labels.astype(bool)].copy()
    wrong["error"] = (wrong["label"] - wrong["probability"]).abs()
    wrong = wrong.sort_values("error", ascending=False, kind="mergesort")
    shown = wrong.head(n_wrong)
    draw_wrong_grid(
        shown,
        image_root,
        out_dir / "wrong.png",
        title=f"{len(wrong)} of {len(oof)} misclassified at threshold {thr_value:.4g}; "
        f"the {len(shown)} most confident",
    )
    summary = {
        "n": int(len(oof)),
        "auc": auc,
        "threshold": thr_value,
        "threshold_rule": "youden" if thr == "youden" else "fixed",
        "confusion": counts,
        "n_wrong": int(len(wrong)),
        "most_confidently_wrong": [
            {"name": r.name, "label": int(r.label), "probability": float(r.probability)}
            for r in shown.itertuples(index=False)
        ],
        "files": ["roc.png", "confusion.png", "wrong.png"],
    }
    (out_dir / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_oof(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"name": str})
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    need = {"name", "label", "probability"}
    if not need <= set(df.columns):
        raise UserError(f"{path}: expected columns name,label,fold,probability; found {','.join(df.columns)}")
    return df


def analyze_run(
    run_dir: Path,
    acc=None,
    threshold: str | float = 0.5,
    n_wrong: int = 16,
    out_dir: Path | None = None,
    data_root: Path | None = None,
) -> dict | None:
    """Analyse a CV directory (its oof.csv) or one run (its validation fold, scored if needed).

    Returns the summary on the main process, None on the others."""
    from .cv import fold_oof_for_run, oof_is_fresh
    from .predict import is_cv_dir, load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    root = Path(data_root) if data_root else Path(cfg.data.root)
    if is_cv_dir(run_dir):
        path = run_dir / "oof.csv"
        if not path.is_file():
            raise UserError(
                f"{path} is missing: collect the out-of-fold predictions first with "
                f"`invasive-dist cv --collect --run {run_dir}`"
            )
        oof = read_oof(path)
    else:
        if not oof_is_fresh(run_dir):
            oof = fold_oof_for_run(run_dir, acc, data_root=data_root)
        else:
            oof = read_oof(run_dir / "oof.csv")
    if acc is not None and not acc.is_main_process:
        return None
    return analyze_predictions(
        oof, root, out_dir or run_dir / "analysis", threshold, n_wrong, title=run_dir.name
    )


def cmd_analyze(args) -> int:
    from .predict import is_cv_dir, load_run_config

    run_dir = Path(args.run)
    acc = None
    if not is_cv_dir(run_dir):
        from .cv import oof_is_fresh
        from .distributed import build_accelerator, world_info_from_env

        if not oof_is_fresh(run_dir):
            cfg = load_run_config(run_dir)
            acc = build_accelerator(cfg, world_info_from_env())
    summary = analyze_run(
        run_dir,
        acc,
        threshold=args.threshold,
        n_wrong=args.n_wrong,
        out_dir=Path(args.out) if args.out else None,
        data_root=Path(args.data) if args.data else None,
    )
    if summary is not None:
        out = Path(args.out) if args.out else run_dir / "analysis"
        c = summary["confusion"]
        print(
            f"AUC {summary['auc']:.4f} on {summary['n']} validation images; threshold "
            f"{summary['threshold']:.4g} ({summary['threshold_rule']}): tn {c['tn']} fp {c['fp']} "
            f"fn {c['fn']} tp {c['tp']}; {summary['n_wrong']} misclassified"
        )
        print(f"wrote {out}/roc.png, confusion.png, wrong.png, analysis.json")
    return 0


def add_subcommand(subparsers) -> None:
    """Register ``invasive-dist analyze`` on the CLI's subparsers."""
    s = subparsers.add_parser(
        "analyze", help="ROC curve, confusion matrix and worst images of a run or CV dir"
    )
    s.add_argument(
        "--run-dir",  # first: torchrun's parser rejects --run (its --run-path)
        "--run",
        dest="run",
        required=True,
        help="a training run or a CV directory (invasive-dist cv)",
    )
    s.add_argument("--threshold", default="0.5", help="a probability in [0, 1], or 'youden' (default 0.5)")
    s.add_argument("--n-wrong", type=int, default=16, help="images in wrong.png (default 16)")
    s.add_argument("--out", default=None, help="output folder (default RUN/analysis)")
    s.add_argument("--data", default=None, help="data folder, if it moved since training")
    s.set_defaults(fn=cmd_analyze)
