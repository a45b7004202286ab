"""The recipe table of docs/model-quality.md: recipe variants on the hard synthetic level, measured.

    .venv/bin/python tests/quality/recipe_table.py --work /tmp/recipes            # 3 seeds, ~40 min on 2 cores
    .venv/bin/python tests/quality/recipe_table.py --work /tmp/recipes --seeds 0  # one seed, a quick look

What it runs, through the CLI a user runs (each step resumes: a finished fold or file is kept):

1. ``synth --difficulty hard`` (one data set for every seed: the seeds vary the training).
2. Per seed, two 3-fold ``cv`` runs of the demo recipe (configs/demo.yaml): EMA off, and EMA on
   (``train.ema_decay``), which scores the raw and the EMA weights every epoch and keeps the better.
   The raw weights of the EMA run train exactly as the EMA-off run (the EMA reads the weights and
   draws no random number), so the EMA-off run's test AUC is the "raw only" row.
3. ``predict`` of the EMA run: one fold (fold 0) and the 3-fold ensemble (``mean``, ``rank_mean``);
   TTA ``none`` / ``dihedral``; evaluation on the full frame / a centre crop.
4. One pseudo-labelling round (``cv --pseudo-rounds 1``) on the EMA run, its round-2 ensemble.

Every figure is a test-set AUC against the synthetic set's hidden labels (never the validation
folds the checkpoints were chosen on), except the two "val" rows, which say so. The table is
printed as Markdown with mean, standard deviation and the per-seed values; ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from invasive_dist.metrics import read_metrics, roc_auc  # noqa: E402

CONFIG = ROOT / "configs" / "demo.yaml"
N_FOLDS = 3


def cli(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "invasive_dist", *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}; see {log}")


def test_auc(submission: Path, data: Path) -> float:
    sub = pd.read_csv(submission, dtype={"name": str})
    truth = pd.read_csv(data / "test_labels_hidden.csv", dtype={"name": str})
    merged = sub.merge(truth, on="name", suffixes=("_p", "_y"), validate="one_to_one")
    return roc_auc(merged["invasive_y"].to_numpy(), merged["invasive_p"].to_numpy())


def val_aucs(cv_dir: Path) -> dict[str, float]:
    """Mean over folds of the best epoch's val AUC of the raw weights, of the EMA weights, and of
    the weights each epoch kept (the better of the two)."""
    raw, ema, kept = [], [], []
    for k in range(N_FOLDS):
        rows = [r for r in read_metrics(cv_dir / f"fold{k}") if "val/auc_raw" in r]
        raw.append(max(r["val/auc_raw"] for r in rows))
        ema.append(max(r["val/auc_ema"] for r in rows))
        kept.append(max(r["val/auc"] for r in rows))
    return {"val_raw": float(np.mean(raw)), "val_ema": float(np.mean(ema)), "val_kept": float(np.mean(kept))}


def one_seed(
    seed: int, data: Path, work: Path, overrides: list[str], ema: float, log: Path
) -> dict[str, float]:
    base = [f"data.root={data}", f"data.n_folds={N_FOLDS}", f"seed={seed}", "data.fold_seed=0"]
    base += [f"output.root={work / 'runs'}", *overrides]
    cv = ["cv", "--config", str(CONFIG)]
    off, on = f"s{seed}_ema_off", f"s{seed}_ema_on"
    cli(*cv, *base, "train.ema_decay=0", f"output.name={off}", log=log)
    cli(*cv, *base, f"train.ema_decay={ema}", f"output.name={on}", log=log)
    runs = work / "runs"
    out = work / "subs" / f"s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    row: dict[str, float] = {}

    def predict(name: str, run: Path, *extra: str) -> None:
        path = out / f"{name}.csv"
        if not path.is_file():
            cli("predict", "--run-dir", str(run), "--data", str(data), "--out", str(path), *extra, log=log)
        row[name] = test_auc(path, data)

    predict("ema_off", runs / off)
    predict("ema_on", runs / on)
    predict("one_fold", runs / on / "fold0")
    predict("rank_mean", runs / on, "predict.ensemble=rank_mean")
    predict("tta_dihedral", runs / on, "predict.tta=dihedral")
    predict("centre_crop", runs / on, "data.eval_geometry=center_crop")
    cli(*cv, *base, f"train.ema_decay={ema}", f"output.name={on}", "--pseudo-rounds", "1", log=log)
    if (runs / on / "round2" / "cv.json").is_file():
        predict("pseudo_round", runs / on / "round2")
        row["n_pseudo"] = json.loads((runs / on / "round2" / "cv.json").read_text())["n_pseudo"]
    else:  # no test image passed the thresholds: cv stopped before round 2 (the log says so)
        row["pseudo_round"], row["n_pseudo"] = float("nan"), 0
    row.update(val_aucs(runs / on))
    row["oof_ema_off"] = json.loads((runs / off / "cv.json").read_text())["oof_auc"]
    row["oof_ema_on"] = json.loads((runs / on / "cv.json").read_text())["oof_auc"]
    return row


ROWS = [
    ("ema_off", "EMA off (3-fold mean ensemble, no TTA, full frame)"),
    ("ema_on", "EMA on, best of raw/EMA each epoch (the same ensemble): **reference**"),
    ("val_raw", "val: best epoch, raw weights (mean over folds)"),
    ("val_ema", "val: best epoch, EMA weights (mean over folds)"),
    ("val_kept", "val: best epoch, the better of the two (mean over folds)"),
    ("one_fold", "one fold (fold 0) instead of the ensemble"),
    ("rank_mean", "ensemble by rank mean instead of mean"),
    ("tta_dihedral", "TTA dihedral (8 views)"),
    ("centre_crop", "evaluation on a centre crop instead of the full frame"),
    ("pseudo_round", "one pseudo-label round (p <= 0.05 / >= 0.95), round-2 ensemble"),
    ("n_pseudo", "pseudo-labelled test images (count)"),
    ("oof_ema_off", "OOF AUC, EMA off"),
    ("oof_ema_on", "OOF AUC, EMA on"),
]


def table(results: dict[int, dict[str, float]]) -> str:
    seeds = sorted(results)
    head = "| variant | mean | std | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    lines = [head, "|" + "---|" * (3 + len(seeds))]
    for key, label in ROWS:
        vals = np.array([results[s][key] for s in seeds])
        fmt = ".0f" if key == "n_pseudo" else ".3f"
        per = " | ".join(f"{v:{fmt}}" for v in vals)
        lines.append(
            f"| {label} | {vals.mean():.3f} | {vals.std(ddof=1) if len(vals) > 1 else 0:.3f} | {per} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="data, runs, submissions and the log go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--size", default="384x288", help="synth --size (the demo's)")
    p.add_argument("--ema", type=float, default=0.9, help="train.ema_decay of the EMA runs")
    p.add_argument("--json", type=Path, help="write the per-seed figures here")
    p.add_argument("overrides", nargs="*", help="more config overrides for every run, e.g. train.epochs=6")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    data = work / "data"
    t0 = time.perf_counter()
    cli(
        "synth", "--out", str(data), "--difficulty", "hard", "--n-train", str(args.n_train),
        "--n-test", str(args.n_test), "--size", args.size, "--seed", "0", "--workers", "2", log=log,
    )  # fmt: skip
    results = {}
    for seed in args.seeds:
        results[seed] = one_seed(seed, data, work, args.overrides, args.ema, log)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[seed].items()), flush=True)
    print(table(results))
    print(f"({time.perf_counter() - t0:.0f} s; commands in {log})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"work": str(work), "json": str(args.json)},
                                         "results": results}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
