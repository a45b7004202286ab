"""Error analysis of a finished run or CV directory: ROC curve, confusion matrix, worst images.

    invasive-dist analyze --run-dir runs/r50                      # a CV directory: uses its oof.csv
    invasive-dist analyze --run-dir runs/demo --threshold youden  # one run: scores its validation fold first

Writes into ``RUN/analysis/`` (or ``--out``):

    roc.png         ROC curve of the validation predictions (a CV directory: the out-of-fold curve
                    in black, one thin curve per fold), AUC in the legend
    confusion.png   2x2 confusion matrix at the threshold (default 0.5; ``youden`` picks the one
                    that maximises Youden's J = TPR - FPR on these predictions, an optimistic choice)
    wrong.png       the most confidently wrong validation images (misclassified at the threshold,
                    sorted by how far their logit is on the wrong side), captioned with name, label
                    and probability
    analysis.json   AUC, threshold, counts, and the names of the images in wrong.png

A single run's validation predictions are computed once (best checkpoint, EMA weights if present,
``predict.tta`` of its config) and kept in ``RUN/oof.csv``, the same file ``invasive-dist cv``
writes for each fold. Plots are drawn with Pillow; no plotting library is needed.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pandas as pd

from .cv import fold_oof_for_run, oof_is_fresh, round_dir
from .distributed import accelerator_from_env, decided_by_main, world_info_from_env
from .errors import UserError
from .files import write_json
from .metrics import confusion, roc_auc, youden_threshold
from .plots import draw_confusion, draw_roc, image_grid, roc_curves_for
from .predict import fold_dirs, is_cv_dir, load_run_config

__all__ = ["analyze_predictions", "analyze_run", "cmd_analyze", "cv_report"]

WRONG = (214, 39, 40)  # red: the frame and probability of a misclassified image


# ----------------------------------------------------------------------------------------------
# Putting it together


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


def wrong_caption(row) -> tuple[str, str]:
    """The two caption lines of a misclassified image: name, label[, fold]; its probability."""
    fold = f"  fold {int(row.fold)}" if hasattr(row, "fold") else ""
    return f"{row.name}   label {int(row.label)}{fold}", f"p(invasive) = {row.probability:.4f}"


def analyze_predictions(
    oof: pd.DataFrame,
    image_root: Path,
    out_dir: Path,
    threshold: str | float = 0.5,
    n_wrong: int = 16,
    title: str = "",
) -> dict:
    """Write roc.png, confusion.png, wrong.png and analysis.json for rows of
    name,label,probability[,fold][,logit]. The AUC and the order of wrong.png come from the logits
    when the rows have them (oof.csv files since the logit column): their order is the model's."""
    out_dir = Path(out_dir)
    labels, probs = oof["label"].to_numpy(), oof["probability"].to_numpy()
    scores = oof["logit"].to_numpy() if "logit" in oof else probs
    thr = parse_threshold(threshold)
    thr_value = youden_threshold(labels, probs) if thr == "youden" else float(thr)
    auc = roc_auc(labels, scores)
    draw_roc(roc_curves_for(oof), out_dir / "roc.png", title=f"ROC {title}".strip())
    counts = confusion(labels, probs, thr_value)
    how = "Youden's J" if thr == "youden" else "fixed"
    draw_confusion(counts, thr_value, out_dir / "confusion.png", title=f"{title} ({how} threshold)".strip())
    wrong = oof[(probs >= thr_value) != labels.astype(bool)].copy()
    # How far on the wrong side: the logit (or probability) against the label's sign.
    sign = 1.0 - 2.0 * wrong["label"].to_numpy()
    wrong["error"] = sign * (wrong["logit"] if "logit" in wrong else wrong["probability"] - 0.5)
    wrong = wrong.sort_values("error", ascending=False, kind="mergesort")
    shown = wrong.head(n_wrong)
    image_grid(
        [
            (Path(image_root) / "train" / f"{r.name}.jpg", wrong_caption(r))
            for r in shown.itertuples(index=False)
        ],
        out_dir / "wrong.png",
        title=f"{len(wrong)} of {len(oof)} misclassified at threshold {thr_value:.4g}; "
        f"the {len(shown)} most confident",
        caption_colors=("black", WRONG),
        frame=WRONG,
        empty="no misclassified images",
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
    write_json(out_dir / "analysis.json", summary)
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
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    root = Path(data_root) if data_root else Path(cfg.data.root)
    if is_cv_dir(run_dir):
        path = run_dir / "oof.csv"
        if not path.is_file():
            raise UserError(
                f"{path} is missing: collect the out-of-fold predictions first with "
                f"`invasive-dist cv --collect --run-dir {run_dir}`"
            )
        oof = read_oof(path)
    else:
        if not decided_by_main(acc, partial(oof_is_fresh, run_dir)):
            oof = fold_oof_for_run(run_dir, acc, data_root=data_root)
        else:
            oof = read_oof(run_dir / "oof.csv")
    if acc is not None and not acc.is_main_process:
        return None
    return analyze_predictions(
        oof, root, out_dir or run_dir / "analysis", threshold, n_wrong, title=run_dir.name
    )


def cmd_analyze(args) -> int:
    run_dir = Path(args.run)
    acc = None
    if not is_cv_dir(run_dir):
        # Under a launcher every rank builds the Accelerator (a collective) whatever it sees on disk.
        if world_info_from_env().world_size > 1 or not oof_is_fresh(run_dir):
            cfg = load_run_config(run_dir)
            acc, _ = accelerator_from_env(cfg)
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


# ----------------------------------------------------------------------------------------------
# `invasive-dist report` on a CV directory


def hidden_test_auc(data_root: Path, submission: Path) -> float | None:
    """The AUC of ``submission`` against a synthetic set's ``test_labels_hidden.csv`` (None when
    either is missing or they do not list the same images)."""
    try:
        truth = pd.read_csv(Path(data_root) / "test_labels_hidden.csv", dtype={"name": str})
        sub = pd.read_csv(submission, dtype={"name": str})
        merged = truth.merge(sub, on="name", suffixes=("_true", "_pred"))
    except (OSError, KeyError, ValueError):
        return None
    if len(merged) != len(truth) or len(merged) != len(sub):
        return None
    return roc_auc(merged["invasive_true"].to_numpy(), merged["invasive_pred"].to_numpy())


def cv_report(cv_dir: Path) -> str:
    """`invasive-dist report` of a CV directory: each round's fold AUCs and OOF AUC (from its
    cv.json), and the fold ensemble's test AUC where the test labels are known (a synthetic set)."""
    cv_dir = Path(cv_dir)
    data_root = Path(load_run_config(cv_dir).data.root)
    lines = [f"cv             {cv_dir}"]
    r = 1
    while r == 1 or (round_dir(cv_dir, r) / "cv.json").is_file() or fold_dirs(round_dir(cv_dir, r)):
        rdir = round_dir(cv_dir, r)
        tag = "" if r == 1 else f" (round {r}: {rdir.name}/)"
        try:
            summary = json.loads((rdir / "cv.json").read_text())
        except (OSError, ValueError):
            summary = None
        if summary is None:
            if r == 1:
                raise UserError(
                    f"{rdir}/cv.json is missing or unreadable: the folds are not all finished, or their "
                    f"CV files were not written; `invasive-dist cv --collect --run-dir {rdir}` writes them"
                )
            lines.append(f"round {r}        {rdir}: no cv.json yet (cv --collect --run-dir {rdir})")
            r += 1
            continue
        folds = summary["folds"]
        logged = [f["best_val_auc"] for f in folds if f.get("best_val_auc") is not None]
        lines.append(
            f"fold AUCs      {_aucs(folds)} "
            f"(mean {summary['fold_auc_mean']:.4f} +- {summary['fold_auc_std']:.4f}; tta {summary['tta']}){tag}"
        )
        if logged:
            lines.append(
                f"best val/auc   {', '.join(f'{a:.4f}' for a in logged)} (logged in training, no TTA)"
            )
        lines.append(f"OOF AUC        {summary['oof_auc']:.4f} over {summary['n_images']} images{tag}")
        sub = rdir / "submission.csv"
        auc = hidden_test_auc(data_root, sub)
        if auc is not None:
            lines.append(
                f"test auc       {auc:.4f} ({sub.name}: the fold ensemble, scored with the synthetic "
                f"set's hidden labels){tag}"
            )
        elif not sub.is_file():
            lines.append(
                f"submission     {sub}  (missing: invasive-dist predict --run-dir {rdir} --data {data_root})"
            )
        r += 1
    for label, rel in [("oof", "oof.csv"), ("cv.json", "cv.json"), ("roc", "roc.png")]:
        path = cv_dir / rel
        lines.append(f"{label:<14} {path}{'' if path.exists() else '  (missing)'}")
    lines.append(f"view curves:   tensorboard --logdir {cv_dir}")
    return "\n".join(lines)


def _aucs(folds: list[dict]) -> str:
    return ", ".join(f"{f['auc']:.4f}" for f in folds)
