"""Prediction: a trained run, or a cross-validation directory of fold runs -> Kaggle ``submission.csv``.

    invasive-dist predict --run-dir runs/demo --data data/synthetic               # runs/demo/submission.csv
    invasive-dist predict --run-dir runs/r50 --data /data/invasive predict.tta=dihedral    # r50 = CV dir
    torchrun --nproc_per_node=8 -m invasive_dist predict --run-dir runs/r50 --data /data/invasive

``--run-dir`` is either one training run (it holds ``config.yaml`` and ``checkpoints/``) or a CV
directory written by ``invasive-dist cv`` (it holds ``fold<k>/`` runs). Each run's resolved
``config.yaml`` rebuilds its model and evaluation transform; the ``best`` checkpoint is loaded (its
EMA weights when the run kept them). Test images are sharded across ranks, every image is scored
exactly once, and the main process writes the submission atomically, in the sample submission's
order and with its names.

Test-time augmentation (``predict.tta``): ``flips`` averages 4 views (identity, h, v, h+v),
``dihedral`` the 8 views of the square (4 rotations x optional mirror). With a non-square
``data.image_size`` ([h, w]) the quarter turns would change the input's shape to (w, h), which
training never shows (it turns such inputs by 0 or 180 degrees only), so ``dihedral`` averages the 4
views that keep the shape, the same as ``flips``, and says so in the log (``tta_note``). Views are
made from the eval view of ``data.eval_geometry`` (``center_crop`` or ``full``). The views of a batch are
concatenated and scored in one forward pass on the device, so a dihedral pass of an eval batch of 64
is one forward of 512 images: lower ``data.eval_batch_size`` if that does not fit.

Logits, not probabilities, are what TTA, ensembles and AUCs work on: the views' logits are averaged
(float64), ``predict.ensemble=mean`` averages the members' logits and ``rank_mean`` the ranks of
their logits scaled to [0, 1] (which ignores differences in calibration between members; the AUC
only depends on the order). A sigmoid in float64 is exactly 1.0 for every logit above about 37,
so averaging or ranking probabilities would tie a confident model's predictions and lose their
order. Probabilities are made only where a file is written, by :func:`ordered_probabilities`:
its values keep the logits' order (distinct logits never share a value). A CV directory also gets
``submission_folds.csv`` next to the submission: the ensemble's value and one logit column per
fold (``fold<k>_logit``), for inspection, re-weighting and pseudo-label selection.
:func:`ensemble_files` averages finished submission files the same way.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .build import channels_last_on
from .checkpoint import Checkpointer, load_checkpoint
from .config import Config, load_config
from .data import LoaderSpec, Shard, build_loader
from .data.check import cached_check, check_data
from .data.kaggle import DataIndex, read_name_csv, test_index
from .data.transforms import image_hw
from .distributed import decided_by_main
from .errors import UserError
from .evaluation import gather_unique
from .files import atomic_write
from .models import build_model
from .progress import track

FOLD_DIR_RE = re.compile(r"^fold(\d+)$")
ENSEMBLE_METHODS = ("mean", "rank_mean")


# ----------------------------------------------------------------------------------------------
# Runs and CV directories


def fold_dirs(cv_dir: Path) -> list[Path]:
    """``fold<k>`` sub-directories of ``cv_dir`` that hold a run (config.yaml), sorted by k."""
    cv_dir = Path(cv_dir)
    if not cv_dir.is_dir():
        return []
    found = [
        p
        for p in cv_dir.iterdir()
        if p.is_dir() and FOLD_DIR_RE.match(p.name) and (p / "config.yaml").is_file()
    ]
    return sorted(found, key=lambda p: int(FOLD_DIR_RE.match(p.name).group(1)))


def is_cv_dir(path: Path) -> bool:
    """A CV directory holds ``fold<k>/config.yaml`` runs and is not itself a run."""
    path = Path(path)
    return not (path / "config.yaml").is_file() and bool(fold_dirs(path))


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config of a run; for a CV directory, that of its first fold."""
    run_dir = Path(run_dir)
    if is_cv_dir(run_dir):
        run_dir = fold_dirs(run_dir)[0]
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a training run: {path} is missing (and it holds no fold<k>/ runs "
            "of a CV directory)"
        )
    return load_config(path, ["resume=''", *overrides])


def load_model_for_inference(cfg: Config, run_dir: Path, which: str) -> torch.nn.Module:
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    path = ckpt.best if which == "best" else ckpt.last
    if which == "best" and not path.is_file() and ckpt.best_weights.is_file():
        path = ckpt.best_weights  # a run trimmed to its best weights: the same model, weights only
    if not path.is_file():
        if which == "best" and ckpt.last.is_file():
            hint = f"the run has {ckpt.last.name} (no epoch validated yet?): use predict.checkpoint=last"
        else:
            hint = (
                f"{run_dir} has no checkpoint yet; train it first (invasive-dist train, or "
                "invasive-dist cv for the folds of a CV directory)"
            )
        raise UserError(f"{path} does not exist: {hint}")
    state = load_checkpoint(path)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.weights = None  # everything comes from the checkpoint; never download here
    model = build_model(model_cfg)
    # The weights that validated better when the checkpoint was saved ("ema" or "model"); older
    # checkpoints: the EMA when there is one.
    model.load_state_dict(state[state.get("eval_weights") or ("ema" if state.get("ema") else "model")])
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Test-time augmentation


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a batch (B, C, H, W) for test-time augmentation. ``dihedral`` of a non-square
    batch is its 4 views that keep the shape (see ``tta_note``)."""
    if mode == "none":
        return [images]
    if mode == "flips" or (mode == "dihedral" and images.shape[-1] != images.shape[-2]):
        return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    if mode == "dihedral":
        views = []
        for k in range(4):
            r = torch.rot90(images, k, dims=(-2, -1))
            views += [r, r.flip(-1)]
        return views
    raise UserError(f"predict.tta={mode!r} is not one of none, flips, dihedral")


def tta_note(mode: str, image_size) -> str:
    """What the log says about a TTA mode at this input size ("" when nothing needs saying)."""
    h, w = image_hw(image_size)
    if mode == "dihedral" and h != w:
        return (
            f"predict.tta=dihedral at data.image_size=[{h}, {w}]: a quarter turn would make the input "
            f"{w}x{h}, a shape training never showed (non-square training turns by 0 or 180 degrees "
            "only), so the 4 views that keep the shape are averaged: identity, h, v and h+v flips "
            "(the same as predict.tta=flips)"
        )
    return ""


@torch.no_grad()
def tta_logits(
    model, images: torch.Tensor, mode: str, channels_last: bool = False, autocast=None
) -> torch.Tensor:
    """Mean logit over the TTA views of a batch, all views in one forward pass.

    ``autocast`` is a context-manager factory (e.g. ``accelerator.autocast``); None runs in the
    model's own precision. The one-logit head runs in float32 under autocast (``models``), and its
    output is read as float32. Returns a float64 (B,) tensor on the images' device: the mean of
    logits, not of probabilities, which a float64 sigmoid rounds to exactly 1.0 above logit ~37."""
    views = tta_views(images, mode)
    x = torch.cat(views) if len(views) > 1 else images
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = model(x)
    logits = out.float().reshape(len(views), images.shape[0])
    return logits.double().mean(0)


@torch.no_grad()
def predict_logits(model, loader, acc, tta: str, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positions, mean logit over TTA views) for every sample of the loader's split, each exactly
    once, identical on every rank."""
    idx, logits, labels = [], [], []
    batches = track(loader.iter_epoch(0), f"predict (tta {tta})", loader.steps_per_epoch, "batch")
    for batch in batches:
        logits.append(tta_logits(model, batch.images, tta, channels_last, acc.autocast))
        idx.append(batch.index)
        labels.append(batch.labels)
    res = gather_unique(acc, torch.cat(idx), torch.cat(logits), torch.cat(labels))
    return res.index, res.logits


def require_finite(logits: np.ndarray, what: str) -> None:
    """A NaN or infinite logit (a diverged model) is refused, naming what produced it."""
    bad = ~np.isfinite(np.asarray(logits, dtype=np.float64))
    if bad.any():
        raise UserError(
            f"{what}: {int(bad.sum())} of {bad.size} logits are not finite (NaN or inf); the model "
            "diverged: use an earlier checkpoint (predict.checkpoint=last or another run), or retrain "
            "with a lower optim.lr"
        )


# ----------------------------------------------------------------------------------------------
# Probabilities that keep the logits' order


def expit(z: np.ndarray) -> np.ndarray:
    """The sigmoid in float64 without overflow: exp is only taken of non-positive numbers."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def ordered_probabilities(logits: np.ndarray) -> np.ndarray:
    """Probabilities to write for ``logits``: float64 sigmoids whose order is the logits' order.

    Equal logits get equal values and distinct logits distinct values, so any AUC computed from
    the written file equals the AUC of the logits. The sigmoid itself cannot promise that: in
    float64 it is exactly 1.0 above logit ~36.7 (and ties distinct logits closer than one unit in
    the last place of their probability), which made every prediction of a confident model 1.0.
    Here each value is the sigmoid unless that would tie or reverse it with a neighbour; then it
    is moved by the fewest representable steps that keep the order: with n distinct logits the
    i-th smallest lies in [(i + 1) * 2^-1074, 1 - (n - i) * 2^-53] (the smallest doubles above 0
    and the largest below 1), so a saturated top (or bottom) stays strictly increasing inside
    (0, 1), and then any tie is lowered to one double below its upper neighbour. A value neither
    tied nor within n doubles of 0 or 1 (logits between about -740 and 36 - ln n) is the plain
    sigmoid; the others differ from it by at most n units in the last place.
    The pandas CSV writer prints the shortest text that reads back to the same double, so the
    written values keep the order too (tests/unit/test_saturation.py)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.size == 0:
        return z.copy()
    uniq, inverse = np.unique(z, return_inverse=True)  # sorted; NaN is refused by the callers
    n = len(uniq)
    i = np.arange(n, dtype=np.float64)
    low = (i + 1.0) * np.nextafter(0.0, 1.0)  # subnormal doubles are evenly spaced: exact
    high = 1.0 - (n - i) * 2.0**-53  # doubles in [0.5, 1) are 2^-53 apart: exact
    v = np.minimum(np.maximum(expit(uniq), low), high)
    if n > 1 and not (np.diff(v) > 0).all():
        for k in range(n - 2, -1, -1):  # only ties move; each stays >= low[k] (see above)
            if v[k] >= v[k + 1]:
                v[k] = np.nextafter(v[k + 1], 0.0)
    return v[inverse.reshape(z.shape)]


# ----------------------------------------------------------------------------------------------
# Ensembles


def _scaled_ranks(p: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank) mapped to [0, 1]; 0.5 for a single sample."""
    n = len(p)
    if n == 1:
        return np.array([0.5])
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return (ranks - 1.0) / (n - 1.0)


def combine(logits: np.ndarray, how: str) -> np.ndarray:
    """The values a submission holds for a (members, samples) matrix of logits.

    ``mean``: :func:`ordered_probabilities` of the members' mean logit. ``rank_mean``: the mean of
    each member's ranks (of its logits) scaled to [0, 1]. Either way the order is the ensemble's
    order: no ties that the logits do not have."""
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if how == "mean":
        return ordered_probabilities(logits.mean(0))
    if how == "rank_mean":
        return np.mean([_scaled_ranks(z) for z in logits], axis=0)
    raise UserError(f"predict.ensemble={how!r} is not one of {', '.join(ENSEMBLE_METHODS)}")


def logit(p: np.ndarray) -> np.ndarray:
    """The inverse of :func:`expit` for the values of a written file (0 and 1 map to the logits
    of the smallest double above 0 and the largest below 1: finite, and in order)."""
    p = np.clip(np.asarray(p, dtype=np.float64), np.nextafter(0.0, 1.0), np.nextafter(1.0, 0.0))
    return np.log(p) - np.log1p(-p)


def ensemble_files(paths: Sequence[str | Path], how: str = "mean") -> pd.DataFrame:
    """Average submission CSVs (name,invasive) into one DataFrame, by ``mean`` (of the values'
    logits, as for folds) or ``rank_mean``.

    Each file is read by the sample submission's parser (``kaggle.read_name_csv``): a malformed row
    is a UserError naming the file and line. Every file must list the same names in the same order
    as the first; a file that does not is a UserError naming it and the first row that differs."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("ensemble: no submission files given")
    files = [read_name_csv(p, labelled=False, checked=False) for p in paths]
    names = files[0].names
    cols = []
    for path, rows in zip(paths, files):
        other = rows.names
        if other != names:
            if len(other) != len(names):
                why = f"has {len(other)} rows, {paths[0]} has {len(names)}"
            else:
                row = next(i for i, (a, b) in enumerate(zip(names, other)) if a != b)
                why = f"row {row + 2} is {other[row]!r} where {paths[0]} has {names[row]!r}"
            raise UserError(
                f"{path}: names differ from {paths[0]} ({why}); every file must list the sample "
                "submission's names in its order"
            )
        values = np.empty(len(other), dtype=np.float64)
        for i, (name, text) in enumerate(zip(other, rows.values)):
            try:
                values[i] = float(text)
            except ValueError:
                values[i] = np.nan
            if not np.isfinite(values[i]):
                raise UserError(
                    f"{path} row {i + 2}: image {name!r} has invasive={text!r}; every value must be "
                    "a finite number (a probability)"
                )
        cols.append(values)
    return pd.DataFrame({"name": names, "invasive": combine(logit(np.stack(cols)), how)})


# ----------------------------------------------------------------------------------------------
# Predicting the test set


def write_submission(names: list[str], values: np.ndarray, out: Path, extra: dict | None = None) -> None:
    """``name,invasive`` (plus ``extra`` columns) atomically. ``values`` come from :func:`combine`
    or :func:`ordered_probabilities`: in [0, 1], written at full float64 precision (shortest
    round-trip text), so the file keeps their order."""
    values = np.asarray(values, dtype=np.float64)
    if not ((values >= 0.0) & (values <= 1.0)).all():
        raise RuntimeError("submission values outside [0, 1]")  # a bug: combine never makes them
    df = pd.DataFrame({"name": names, "invasive": values})
    for k, v in (extra or {}).items():
        df[k] = v
    atomic_write(out, lambda tmp: df.to_csv(tmp, index=False))


def write_predictions(
    names: list[str], logits: np.ndarray, how: str, out: Path, members: list[str] | None = None
) -> None:
    """``out``: the submission of a (members, images) matrix of logits. One run (``members`` None):
    its probabilities; several: their ensemble by ``how`` (see :func:`combine`), and next to it
    ``<out>_folds.csv`` with the ensemble's value and one ``<member>_logit`` column per member."""
    logits = np.atleast_2d(logits)
    if members is None:
        write_submission(names, ordered_probabilities(logits[0]), out)
        return
    final = combine(logits, how)
    write_submission(names, final, out)
    write_submission(names, final, folds_file(out), extra={f"{m}_logit": z for m, z in zip(members, logits)})


def folds_file(submission: Path) -> Path:
    """The per-member file written next to a fold ensemble's submission."""
    submission = Path(submission)
    return submission.with_name(f"{submission.stem}_folds.csv")


def read_member_logits(path: Path) -> tuple[list[str], np.ndarray]:
    """(names, (members, images) logits) of a ``<submission>_folds.csv`` file."""
    df = pd.read_csv(path, dtype={"name": str})
    cols = [c for c in df.columns if c.endswith("_logit")]
    if not cols:
        raise UserError(f"{path}: no <fold>_logit columns; predict the CV directory again")
    return list(df["name"]), df[cols].to_numpy(dtype=np.float64).T


def _checked_test_index(cfg: Config) -> DataIndex:
    """The test images of ``data.root`` in submission order, after the data check training runs
    (of the run's ``data.labels_csv``, cached unless ``data.check_cache`` is false): a missing,
    empty, truncated or non-JPEG test image stops prediction with a message naming it (a
    submission must cover all)."""
    d = cfg.data
    index = test_index(d.root)
    if d.check_cache:
        report = cached_check(Path(d.root), d.labels_csv, Path(cfg.output.root) / ".data-check")
    else:
        report = check_data(Path(d.root), d.labels_csv)
    report.require("predict")
    return index


def predict_member(
    run_dir: Path, index: DataIndex, acc, cfg: Config, checkpoint: str | None = None
) -> np.ndarray:
    """Logits (mean over TTA views) of one run for every image of ``index`` (in index order), on
    every rank."""
    device = acc.device
    channels_last = channels_last_on(cfg, device)
    model = load_model_for_inference(cfg, run_dir, checkpoint or cfg.predict.checkpoint).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.data.backend == "synthetic":
        raise UserError("data.backend=synthetic produces random tensors; predict needs a real backend")
    shard = Shard(acc.process_index, acc.num_processes)
    note = tta_note(cfg.predict.tta, cfg.data.image_size)
    if note and acc.is_main_process:
        print(note, flush=True)
    loader = build_loader(
        LoaderSpec.of(index, cfg.data, shard, device, False, cfg.seed, channels_last), cfg.data
    )
    positions, logits = predict_logits(model, loader, acc, cfg.predict.tta, channels_last)
    if len(positions) != len(index) or not np.array_equal(positions, np.arange(len(index))):
        raise RuntimeError(f"prediction covered {len(positions)} of {len(index)} images")  # a bug
    require_finite(logits, f"{run_dir} ({checkpoint or cfg.predict.checkpoint} checkpoint)")
    del model
    return logits


def predict_run(
    run_dir: Path, data_root: Path, acc, out: Path | None = None, overrides: tuple[str, ...] = ()
) -> Path:
    """Predict the test set of ``data_root`` with one run or every fold of a CV directory.

    Returns the submission path (``RUN/submission.csv`` unless ``out``); the main process writes it."""
    run_dir, data_root = Path(run_dir), Path(data_root)
    # Which runs are members is read from the files once, by the main process (see decided_by_main).
    members = decided_by_main(acc, lambda: fold_dirs(run_dir) if is_cv_dir(run_dir) else [run_dir])
    cfgs = [load_run_config(m, overrides) for m in members]
    for c in cfgs:
        c.data.root = str(data_root)
    how = cfgs[0].predict.ensemble
    with acc.main_process_first():  # main checks and caches; the others read the cache
        index = _checked_test_index(cfgs[0])
    logits = []
    for member, cfg in zip(members, cfgs):
        z = predict_member(member, index, acc, cfg)
        logits.append(z)
        if len(members) > 1 and acc.is_main_process:
            print(f"predicted {len(z)} test images with {member} (tta {cfg.predict.tta})", flush=True)
    out = Path(out) if out else run_dir / "submission.csv"
    if acc.is_main_process:
        cv = [m.name for m in members] if len(members) > 1 else None
        write_predictions(index.names, np.stack(logits), how, out, cv)
    acc.wait_for_everyone()
    return out
