"""K-fold cross-validation: every fold, out-of-fold (OOF) predictions, and pseudo-labelling rounds.

    invasive-dist cv --config configs/resnet50_kaggle.yaml                  # all folds, one after another
    torchrun --nproc_per_node=8 -m invasive_dist cv --config configs/resnext101_8gpu.yaml
    invasive-dist cv --config C.yaml --only-fold 3                          # one fold (e.g. a Slurm array task)
    invasive-dist cv --config C.yaml data.fold=3 output.name=r50/fold3      # the same, as cv_array.sbatch says it
    invasive-dist cv --collect --run-dir runs/r50                               # OOF of folds trained elsewhere
    invasive-dist cv --config C.yaml --pseudo-rounds 1 --pseudo-low 0.05 --pseudo-high 0.95

The CV directory is ``output.root/output.name``:

    fold<k>/              a training run of fold k (config.yaml, checkpoints/, metrics.jsonl, ...) and
                          its oof.csv: the validation fold scored by the fold's best checkpoint
    oof.csv               name,label,fold,probability,logit: every labelled image once, scored by the
                          model that did not train on it (EMA weights when kept; the mean logit of
                          the ``predict.tta`` views, and a probability that keeps the logits' order)
    cv.json               per-fold AUCs, the OOF AUC (both of the logits), the settings
    roc.png               OOF ROC curve, one thin curve per fold
    submission.csv        (pseudo-labelling only) this round's fold-ensemble test predictions
    pseudo_round1.csv     test images whose mean probability over the round-1 folds is <= pseudo-low
                          (label 0) or >= pseudo-high (label 1): name,invasive
    round2/               round 2: the same layout, trained with data.pseudo_csv=pseudo_round1.csv

Folds run one after another in one launch; under torchrun every rank takes part in every fold, each
fold building its Trainer on the same Accelerator. A fold whose ``checkpoints/best.pt`` and
``oof.csv`` exist is skipped, so re-running the command after a crash or a preemption only does what
is left; an unfinished fold continues from its ``last`` checkpoint (``resume=auto``). What is finished
is decided by the main process and broadcast (``distributed.decided_by_main``): on NFS the ranks'
views of the files can differ for a while, and ranks that branch differently hang in collectives.

Slurm arrays: a task that runs ``cv`` with ``--only-fold K`` (or ``data.fold=K
output.name=NAME/foldK``) trains fold K and writes its oof.csv; the task that finds every fold
finished also writes the CV files. ``cv --collect --run-dir DIR`` does that afterwards and scores the
folds that were trained with ``invasive-dist train`` instead. With ``--pseudo-rounds 1`` it also
writes the pseudo-label file for the next round and prints the command that trains it.

The OOF AUC is the AUC of all OOF predictions pooled, not the mean of the fold AUCs (both are
reported): pooling also rewards folds that are calibrated alike, as a fold ensemble needs. Pseudo
labels join the training folds only (``build.build_data`` adds them there). Round-2 OOF AUCs are slightly
optimistic: the round-1 ensemble that labelled the test images had trained on every validation fold.
"""

from __future__ import annotations

import copy
import gc
import json
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .build import Data, build_data, channels_last_on, resolve_batch
from .config import Config, load_config, to_dict
from .distributed import accelerator_from_env, build_accelerator, decided_by_main, world_info_from_env
from .errors import UserError
from .files import atomic_write, write_json
from .metrics import read_metrics, roc_auc
from .plots import draw_roc, roc_curves_for
from .predict import (
    FOLD_DIR_RE,
    expit,
    fold_dirs,
    folds_file,
    load_model_for_inference,
    load_run_config,
    ordered_probabilities,
    predict_logits,
    predict_run,
    read_member_logits,
    require_finite,
)
from .train import Trainer, build_parts

ROUND_DIR_RE = re.compile(r"^round(\d+)$")
OOF_COLUMNS = ["name", "label", "fold", "probability", "logit"]

# Settings that may change between a fold's training and a re-run without making it a different
# experiment (paths, logging, inference and launch details).
_COMPAT_IGNORED = (
    "resume",
    "output.",
    "predict.",
    "profile.",
    "dist.",
    "data.root",
    "data.fold",
    "data.torch.",
    "data.eval_batch_size",
    "data.check_cache",
    "data.backend",
    "data.dali.",
    "train.log_every",
    "checkpoint.",
)


@dataclass
class FoldStatus:
    fold: int
    run_dir: Path
    action: str  # trained | skipped | collected


# ----------------------------------------------------------------------------------------------
# Small helpers


def _print(acc, msg: str) -> None:
    if acc is None or acc.is_main_process:
        print(msg, flush=True)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _free(acc) -> None:
    """Between folds: drop the references Accelerate keeps to prepared models/optimizers, and
    torch.compile's caches (each fold's new model would otherwise count as a recompile of the same
    code, and after cache_size_limit (8) recompiles dynamo silently falls back to eager)."""
    if acc is not None:
        acc.free_memory()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Config, new: Config) -> list[str]:
    """``key: old -> new`` for settings that make a kept fold a different experiment."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in _COMPAT_IGNORED):
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs


def oof_is_fresh(run_dir: Path) -> bool:
    """True when ``run_dir/oof.csv`` exists, is not older than ``checkpoints/best.pt`` and has the
    current columns (an oof.csv without the logit column is scored again)."""
    best = Path(run_dir) / "checkpoints" / "best.pt"
    oof = Path(run_dir) / "oof.csv"
    try:
        if not (best.is_file() and oof.stat().st_mtime >= best.stat().st_mtime):
            return False
        with oof.open() as f:
            return f.readline().strip().split(",") == OOF_COLUMNS
    except OSError:
        return False


def fold_cfg(base: Config, cv_name: str, k: int) -> Config:
    """The config of fold ``k``: its validation fold, its run directory, resume from its `last`."""
    cfg = copy.deepcopy(base)
    cfg.data.fold = k
    cfg.output.name = f"{cv_name}/fold{k}"
    cfg.resume = "auto"
    return cfg


# ----------------------------------------------------------------------------------------------
# Out-of-fold predictions of one fold


def fold_oof(cfg: Config, data: Data, run_dir: Path, acc) -> pd.DataFrame:
    """Score the run's validation split (``data.val_loader``) with its best checkpoint (EMA
    weights if kept), averaging ``predict.tta`` views; the main process writes
    ``run_dir/oof.csv``. Collective."""
    channels_last = channels_last_on(cfg, acc.device)
    model = load_model_for_inference(cfg, run_dir, "best").to(acc.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    positions, logits = predict_logits(model, data.val_loader, acc, cfg.predict.tta, channels_last)
    val = data.val_idx
    if len(positions) != len(val):
        raise RuntimeError(f"OOF covered {len(positions)} of {len(val)} validation images")  # a bug
    require_finite(logits, f"{run_dir}/checkpoints/best.pt on its validation fold")
    df = pd.DataFrame(
        {
            "name": [val.names[i] for i in positions],
            "label": val.labels[positions].astype(np.int64),
            "fold": cfg.data.fold,
            "probability": ordered_probabilities(logits),
            "logit": logits.astype(np.float64),
        }
    )
    if acc.is_main_process:
        _write_csv(df, Path(run_dir) / "oof.csv")
    acc.wait_for_everyone()
    return df


def _cfg_for_existing_run(run_dir: Path, data_root: Path | None = None) -> Config:
    """A finished run's config, pointed at the run's actual directory (it may have been moved)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data_root is not None:
        cfg.data.root = str(data_root)
    if cfg.run_dir.resolve() != run_dir.resolve():
        cfg.output.root, cfg.output.name = str(run_dir.parent), run_dir.name
    return cfg


def fold_oof_for_run(run_dir: Path, acc=None, world=None, data_root: Path | None = None) -> pd.DataFrame:
    """Out-of-fold predictions of a finished run (its validation fold), written to RUN/oof.csv.

    The validation split is rebuilt from the run's config by the builder training uses, so it is
    exactly the one the run validated on (same seed, folds and data check); only the validation
    loader is built (no optimizer, no training cache) and nothing is trained."""
    run_dir = Path(run_dir)
    cfg = _cfg_for_existing_run(run_dir, data_root)
    world = world or world_info_from_env()
    acc = acc or build_accelerator(cfg, world)
    if not decided_by_main(acc, (run_dir / "checkpoints" / "best.pt").is_file):
        raise UserError(f"{run_dir}/checkpoints/best.pt does not exist: the run has not finished an epoch")
    data = build_data(cfg, acc, resolve_batch(cfg, acc.num_processes), train=False)
    try:
        return fold_oof(cfg, data, run_dir, acc)
    finally:
        del data
        _free(acc)


# ----------------------------------------------------------------------------------------------
# A round: train (or collect) the folds, then the CV files


def train_folds(base: Config, cv_name: str, folds: list[int], acc, world) -> list[FoldStatus]:
    """Train and score each fold of ``folds`` not already finished. Collective."""
    done = []
    n = base.data.n_folds
    for k in folds:
        cfg = fold_cfg(base, cv_name, k)
        run_dir = cfg.run_dir
        acc.wait_for_everyone()  # the previous fold's files are written before anyone decides
        if decided_by_main(acc, partial(oof_is_fresh, run_dir)):
            _print(
                acc, f"[cv] fold {k}/{n}: skipped (finished: {run_dir}/checkpoints/best.pt and oof.csv exist)"
            )
            diffs = config_differences(load_run_config(run_dir), cfg) if acc.is_main_process else []
            if diffs:
                _print(
                    acc,
                    f"[cv] warning: fold {k} was trained with other settings ({'; '.join(diffs[:6])}); "
                    f"it is kept: delete {run_dir} to train it again",
                )
            done.append(FoldStatus(k, run_dir, "skipped"))
            continue
        t0 = time.perf_counter()
        _print(acc, f"[cv] fold {k}/{n}: training in {run_dir}")
        parts = build_parts(cfg, acc, world)
        try:
            result = Trainer(cfg, acc, world, parts).fit()
            df = fold_oof(cfg, parts.data, run_dir, acc)
        finally:
            parts.data.close()
            del parts
            _free(acc)
        auc = roc_auc(df["label"].to_numpy(), df["logit"].to_numpy())
        _print(
            acc,
            f"[cv] fold {k}/{n}: best val/auc {result.best_auc:.4f}; OOF AUC {auc:.4f} "
            f"(tta {cfg.predict.tta}, {len(df)} images) in {time.perf_counter() - t0:.0f}s",
        )
        done.append(FoldStatus(k, run_dir, "trained"))
    return done


def collect_folds(cv_dir: Path, n_folds: int, acc, world, data_root: Path | None = None) -> list[FoldStatus]:
    """Score every fold of ``cv_dir`` that has a best checkpoint but no fresh oof.csv. Collective;
    what is on disk is decided by the main process (:func:`decided_by_main`)."""
    found = {int(FOLD_DIR_RE.match(p.name).group(1)): p for p in fold_dirs(cv_dir)}

    def without_best() -> list[int]:
        return [
            k
            for k in range(n_folds)
            if k not in found or not (found[k] / "checkpoints" / "best.pt").is_file()
        ]

    missing = decided_by_main(acc, without_best)
    if missing:
        raise UserError(
            f"{cv_dir}: fold(s) {', '.join(map(str, missing))} of {n_folds} have no checkpoints/best.pt; "
            f"train them first (invasive-dist cv --config CONFIG --only-fold K, or the Slurm array)"
        )
    out = []
    for k in range(n_folds):
        run_dir = cv_dir / f"fold{k}"
        acc.wait_for_everyone()
        if decided_by_main(acc, partial(oof_is_fresh, run_dir)):
            out.append(FoldStatus(k, run_dir, "skipped"))
            continue
        cfg = load_run_config(run_dir)
        if cfg.data.fold != k:
            raise UserError(
                f"{run_dir}/config.yaml says data.fold={cfg.data.fold}, but the directory is fold{k}"
            )
        _print(
            acc, f"[cv] fold {k}/{n_folds}: scoring the validation fold with {run_dir}/checkpoints/best.pt"
        )
        fold_oof_for_run(run_dir, acc, world, data_root)
        out.append(FoldStatus(k, run_dir, "collected"))
    return out


def unfinished_folds(cv_dir: Path, n_folds: int, acc=None) -> list[int]:
    """The folds of ``cv_dir`` without a fresh oof.csv, as the main process sees them. Collective."""
    return decided_by_main(
        acc, lambda: [k for k in range(n_folds) if not oof_is_fresh(Path(cv_dir) / f"fold{k}")]
    )


def write_cv_files(cv_dir: Path, n_folds: int, round_no: int = 1) -> dict:
    """Pool the folds' oof.csv into CV_DIR/oof.csv, write cv.json and roc.png; returns cv.json's dict.

    Each labelled image must appear in exactly one fold."""
    cv_dir = Path(cv_dir)
    parts = []
    for k in range(n_folds):
        path = cv_dir / f"fold{k}" / "oof.csv"
        df = pd.read_csv(path, dtype={"name": str})
        if list(df.columns) != OOF_COLUMNS or (df["fold"] != k).any():
            raise UserError(
                f"{path}: expected columns {','.join(OOF_COLUMNS)} with fold={k} on every row (a file "
                f"written before the logit column is scored again by `invasive-dist cv --collect "
                f"--run-dir {cv_dir}`)"
            )
        parts.append(df)
    oof = pd.concat(parts, ignore_index=True)
    dup = oof[oof["name"].duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]["name"]
        folds = sorted(dup[dup["name"] == first]["fold"].tolist())
        raise UserError(
            f"{cv_dir}: image {first!r} is in the validation fold of folds {folds}; the folds were "
            "trained with different seed/data.fold_seed/data.n_folds/data.limit settings: retrain them with "
            "one config"
        )
    key = oof["name"].map(lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    oof = oof.iloc[np.argsort(key.to_numpy(), kind="mergesort")].reset_index(drop=True)
    # The pooled probabilities keep the order of all folds' logits (each fold's file keeps its own).
    oof["probability"] = ordered_probabilities(oof["logit"].to_numpy())
    _write_csv(oof, cv_dir / "oof.csv")

    cfg0 = load_run_config(cv_dir / "fold0")
    folds = []
    for k, df in enumerate(parts):
        hist = [r["val/auc"] for r in read_metrics(cv_dir / f"fold{k}") if "val/auc" in r]
        folds.append(
            {
                "fold": k,
                "n": int(len(df)),
                "auc": roc_auc(df["label"].to_numpy(), df["logit"].to_numpy()),
                "best_val_auc": max(hist) if hist else None,  # no TTA, as logged during training
                "epochs": len(hist),
                "run_dir": f"fold{k}",
            }
        )
    fold_aucs = np.array([f["auc"] for f in folds], dtype=np.float64)
    pseudo = cfg0.data.pseudo_csv
    summary = {
        "cv_dir": str(cv_dir),
        "round": round_no,
        "n_folds": n_folds,
        "n_images": int(len(oof)),
        "oof_auc": roc_auc(oof["label"].to_numpy(), oof["logit"].to_numpy()),
        "fold_auc_mean": float(np.nanmean(fold_aucs)),
        "fold_auc_std": float(np.nanstd(fold_aucs)),
        "folds": folds,
        "tta": cfg0.predict.tta,
        "arch": cfg0.model.arch,
        "image_size": cfg0.data.image_size,
        "seed": cfg0.seed,
        "pseudo_csv": pseudo,
        "n_pseudo": int(len(pd.read_csv(pseudo))) if pseudo and Path(pseudo).is_file() else 0,
    }
    write_json(cv_dir / "cv.json", summary)
    draw_roc(roc_curves_for(oof), cv_dir / "roc.png", title=f"{cv_dir.name}: out-of-fold ROC")
    return summary


def _report(summary: dict) -> str:
    folds = ", ".join(f"{f['auc']:.4f}" for f in summary["folds"])
    return (
        f"[cv] OOF AUC {summary['oof_auc']:.4f} over {summary['n_images']} images "
        f"(fold AUCs {folds}; mean {summary['fold_auc_mean']:.4f} +- {summary['fold_auc_std']:.4f}); "
        f"wrote {summary['cv_dir']}/oof.csv, cv.json, roc.png"
    )


# ----------------------------------------------------------------------------------------------
# Pseudo-labels


def round_dir(cv_root: Path, r: int) -> Path:
    return Path(cv_root) if r == 1 else Path(cv_root) / f"round{r}"


def pseudo_path(cv_root: Path, r: int) -> Path:
    return Path(cv_root) / f"pseudo_round{r}.csv"


def select_pseudo(names: list[str], fold_logits: np.ndarray, low: float, high: float) -> pd.DataFrame:
    """Test images whose mean fold probability is <= low (label 0) or >= high (label 1), as
    name,invasive. The mean of the folds' probabilities (from their logits), whatever
    ``predict.ensemble`` wrote into the submission: under ``rank_mean`` that holds ranks, and
    thresholds on ranks would always take the top and bottom images however unsure the folds are."""
    p = expit(np.atleast_2d(fold_logits)).mean(0)
    keep = (p <= low) | (p >= high)
    return pd.DataFrame(
        {
            "name": pd.Series([n for n, k in zip(names, keep) if k], dtype=object),
            "invasive": (p[keep] >= high).astype(np.int64),
        }
    )


def pseudo_message(chosen: pd.DataFrame, n_test: int, low: float, high: float, out: Path, rdir: Path) -> str:
    """The log line(s) of a pseudo-label selection, with a warning when every pick is one class."""
    n1 = int(chosen["invasive"].sum())
    n0 = len(chosen) - n1
    msg = (
        f"[cv] pseudo-labels: {len(chosen)} of {n_test} test images (mean fold p <= {low}: {n0} as 0, "
        f"p >= {high}: {n1} as 1) -> {out}"
    )
    if len(chosen) and (n0 == 0 or n1 == 0):
        cls = 1 if n0 == 0 else 0
        aucs = ""
        try:
            folds = json.loads((Path(rdir) / "cv.json").read_text())["folds"]
            listed = ", ".join(f"{f['auc']:.3f}" for f in folds)
            aucs = f" (fold AUCs {listed} in {rdir}/cv.json)"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        msg += (
            f"\n[cv] warning: all {len(chosen)} pseudo-labels are class {cls}: the fold ensemble does not "
            f"separate the test images{aucs}. Training the next round on them teaches it one class. "
            f"Check the folds (a fold near AUC 0.5 did not learn: retrain it), or choose thresholds "
            f"that also take the other class (--pseudo-low/--pseudo-high), or delete {out} and run "
            "without --pseudo-rounds"
        )
    return msg


def _no_rows(csv_path: Path) -> bool:
    return len(pd.read_csv(csv_path)) == 0


def pseudo_is_fresh(path: Path, rdir: Path) -> bool:
    """``path`` exists and is not older than any fold's best checkpoint in ``rdir``."""
    try:
        bests = [p / "checkpoints" / "best.pt" for p in fold_dirs(rdir)]
        return path.is_file() and all(path.stat().st_mtime >= b.stat().st_mtime for b in bests)
    except OSError:
        return False


def write_pseudo_labels(cv_root: Path, r: int, data_root: Path, acc, low: float, high: float) -> Path:
    """Predict the test set with round ``r``'s fold ensemble (its ``submission.csv``) and write
    ``pseudo_round<r>.csv`` from the folds' mean probability (:func:`select_pseudo`). Kept if it is
    newer than every fold's best checkpoint. Collective."""
    rdir = round_dir(cv_root, r)
    out = pseudo_path(cv_root, r)
    acc.wait_for_everyone()
    if decided_by_main(acc, lambda: pseudo_is_fresh(out, rdir)):
        _print(acc, f"[cv] pseudo-labels: kept {out} (newer than round {r}'s checkpoints)")
        return out
    sub_path = predict_run(rdir, data_root, acc, out=rdir / "submission.csv")
    if acc.is_main_process:
        names, fold_logits = read_member_logits(folds_file(sub_path))
        chosen = select_pseudo(names, fold_logits, low, high)
        _write_csv(chosen, out)
        print(pseudo_message(chosen, len(names), low, high, out, rdir), flush=True)
    acc.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------------------------
# The command


def _split_cv_name(cfg: Config, only_fold: int | None) -> tuple[str, list[int] | None]:
    """(CV directory name under output.root, the folds to train or None for all).

    ``output.name=NAME/fold3`` means: this is fold 3 of the CV directory NAME (a Slurm array task)."""
    name = cfg.output.name.rstrip("/")
    m = FOLD_DIR_RE.match(Path(name).name)
    if m:
        k = int(m.group(1))
        parent = str(Path(name).parent)
        if parent in ("", "."):
            raise UserError(
                f"output.name={name!r} names a fold but no CV directory: use output.name=NAME/{name}"
            )
        if only_fold is not None and only_fold != k:
            raise UserError(f"--only-fold {only_fold} but output.name={name!r} is fold {k}")
        if cfg.data.fold != k:
            raise UserError(
                f"output.name={name!r} is fold {k} but data.fold={cfg.data.fold}: pass data.fold={k} "
                f"(slurm/cv_array.sbatch passes both from SLURM_ARRAY_TASK_ID)"
            )
        return parent, [k]
    if only_fold is not None:
        if not 0 <= only_fold < cfg.data.n_folds:
            raise UserError(f"--only-fold {only_fold}: must satisfy 0 <= K < data.n_folds={cfg.data.n_folds}")
        return name, [only_fold]
    return name, None


def _check_pseudo_args(args) -> None:
    if args.pseudo_rounds < 0:
        raise UserError(f"--pseudo-rounds {args.pseudo_rounds} must be >= 0")
    if not 0.0 <= args.pseudo_low < args.pseudo_high <= 1.0:
        raise UserError(
            f"--pseudo-low {args.pseudo_low} / --pseudo-high {args.pseudo_high}: need 0 <= low < high <= 1"
        )


def cmd_collect(args) -> int:
    if args.run:
        cv_dir = Path(args.run)
    elif args.config:
        cv_dir = load_config(args.config, args.overrides).run_dir
    else:
        raise UserError(
            "cv --collect needs --run-dir CV_DIR (or --config, whose output.root/output.name is the CV dir)"
        )
    if not fold_dirs(cv_dir):
        raise UserError(f"{cv_dir} holds no fold<k>/ runs; train them first (invasive-dist cv --config ...)")
    cfg = load_run_config(cv_dir)
    n = cfg.data.n_folds
    acc, world = accelerator_from_env(cfg)
    collect_folds(cv_dir, n, acc, world, Path(args.data) if args.data else None)
    m = ROUND_DIR_RE.match(cv_dir.name)
    r, cv_root = (int(m.group(1)), cv_dir.parent) if m else (1, cv_dir)
    if acc.is_main_process:
        print(_report(write_cv_files(cv_dir, n, r)), flush=True)
    acc.wait_for_everyone()
    if args.pseudo_rounds > 0:
        data_root = Path(args.data) if args.data else Path(cfg.data.root)
        pseudo = write_pseudo_labels(cv_root, r, data_root, acc, args.pseudo_low, args.pseudo_high)
        name = f"{cv_root.name}/round{r + 1}"
        _print(
            acc,
            f"[cv] next round: invasive-dist cv --config CONFIG output.root={cv_root.parent} "
            f"output.name={name} data.pseudo_csv={pseudo}   (or the Slurm array with "
            f"output.name={name}/fold$K data.fold=$K data.pseudo_csv={pseudo})",
        )
    return 0


def cmd_cv(args) -> int:
    _check_pseudo_args(args)
    if args.collect:
        return cmd_collect(args)
    cfg = load_config(args.config, args.overrides)
    cv_name, only = _split_cv_name(cfg, args.only_fold)
    if only is not None and args.pseudo_rounds:
        raise UserError(
            "--pseudo-rounds needs every fold of the round: train the folds (e.g. the Slurm array), then "
            "`invasive-dist cv --collect --run-dir CV_DIR --pseudo-rounds 1` writes the pseudo-labels"
        )
    acc, world = accelerator_from_env(cfg)
    n = cfg.data.n_folds
    # output.name=NAME/round2 continues the rounds of NAME (e.g. after `cv --collect --pseudo-rounds 1`).
    m = ROUND_DIR_RE.match(Path(cv_name).name)
    start, root_name = (int(m.group(1)), str(Path(cv_name).parent)) if m else (1, cv_name)
    cv_root = Path(cfg.output.root) / root_name
    folds = only if only is not None else list(range(n))
    base = cfg
    for r in range(start, start + args.pseudo_rounds + 1):
        name = root_name if r == 1 else f"{root_name}/round{r}"
        if r > start:
            base = copy.deepcopy(cfg)
            base.data.pseudo_csv = str(pseudo_path(cv_root, r - 1))
            _print(acc, f"[cv] round {r}: training with pseudo-labels {base.data.pseudo_csv}")
        rdir = round_dir(cv_root, r)
        train_folds(base, name, folds, acc, world)
        acc.wait_for_everyone()
        left = unfinished_folds(rdir, n, acc)
        if left:
            _print(
                acc,
                f"[cv] {n - len(left)} of {n} folds of {rdir} finished; left: {left}. The CV files are "
                f"written by the task that finishes the last fold, or by `invasive-dist cv --collect --run-dir {rdir}`",
            )
            return 0
        if acc.is_main_process:
            print(_report(write_cv_files(rdir, n, r)), flush=True)
        acc.wait_for_everyone()
        if r < start + args.pseudo_rounds:
            pseudo = write_pseudo_labels(
                cv_root, r, Path(cfg.data.root), acc, args.pseudo_low, args.pseudo_high
            )
            if decided_by_main(acc, partial(_no_rows, pseudo)):
                _print(
                    acc,
                    f"[cv] no test image passed the thresholds in {pseudo}; stopping before round {r + 1}",
                )
                break
    _print(acc, f"[cv] done; predict with: invasive-dist predict --run-dir {rdir} --data {cfg.data.root}")
    return 0
