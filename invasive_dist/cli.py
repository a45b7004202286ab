"""One entry point: ``invasive-dist <command>`` (also ``python -m invasive_dist <command>``).

    invasive-dist synth --out data/synthetic --n-train 300 --size 384x288
    invasive-dist check-data --data data/synthetic
    invasive-dist eda --data data/synthetic --out runs/eda
    invasive-dist train --config configs/demo.yaml train.epochs=3 model.arch=resnet34
    invasive-dist predict --run runs/demo --data data/synthetic

``train`` and ``predict`` run unchanged under python, torchrun, accelerate launch and Slurm.
User errors print one message and exit 2; a run stopped by SIGTERM/SIGUSR1 saves and exits 143.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1154x866") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"--size {text!r}: width and height must be >= 16")
    return w, h


def cmd_synth(args) -> int:
    from .data.synth import synthesize

    summary = synthesize(
        Path(args.out),
        n_train=args.n_train,
        n_test=args.n_test,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
    )
    print(summary.format())
    return 0


def cmd_check_data(args) -> int:
    from .data.check import check_data

    report = check_data(Path(args.data), args.labels_csv)
    print(report.format())
    return 0 if report.ok else 1


def cmd_eda(args) -> int:
    from .eda import run_eda

    summary = run_eda(Path(args.data), Path(args.out), labels_csv=args.labels_csv)
    print(json.dumps(summary, indent=2))
    print(f"EDA written to {args.out}")
    return 0


def _accelerator(cfg):
    from .distributed import build_accelerator, world_info_from_env

    world = world_info_from_env()
    return build_accelerator(cfg, world), world


def cmd_train(args) -> int:
    from .config import load_config
    from .train import Trainer, build_parts

    cfg = load_config(args.config, args.overrides)
    acc, world = _accelerator(cfg)
    result = Trainer(cfg, acc, world, build_parts(cfg, acc, world)).fit()
    if acc.is_main_process:
        print(
            f"best val/auc {result.best_auc:.4f} after {result.epoch} epoch(s); run directory {cfg.run_dir}"
        )
    return 0


def cmd_predict(args) -> int:
    from accelerate import Accelerator

    from .predict import load_run_config, predict_run

    cfg = load_run_config(Path(args.run), args.overrides)
    acc, _ = _accelerator(cfg)
    assert isinstance(acc, Accelerator)
    out = predict_run(
        Path(args.run), Path(args.data), acc, Path(args.out) if args.out else None, tuple(args.overrides)
    )
    if acc.is_main_process:
        print(f"wrote {out}")
    return 0


def _hidden_test_auc(run: Path) -> float | None:
    """A synthetic set keeps its test labels in test_labels_hidden.csv: score the submission."""
    import pandas as pd
    import yaml

    from .metrics import roc_auc

    try:
        root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
        truth = pd.read_csv(root / "test_labels_hidden.csv", dtype={"name": str})
        sub = pd.read_csv(run / "submission.csv", dtype={"name": str})
    except (OSError, KeyError, TypeError, ValueError):
        return None
    merged = truth.merge(sub, on="name", suffixes=("_true", "_pred"))
    if len(merged) != len(truth):
        return None
    return roc_auc(merged["invasive_true"].to_numpy(), merged["invasive_pred"].to_numpy())


def cmd_report(args) -> int:
    from .metrics import read_metrics

    run = Path(args.run)
    rows = read_metrics(run)
    val = [r for r in rows if "val/auc" in r]
    if not val:
        raise UserError(f"{run}/metrics.jsonl has no validation results: is {run} a finished training run?")
    best = max(val, key=lambda r: r["val/auc"])
    perf = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r]
    print(f"run            {run}")
    print(
        f"val/auc        {best['val/auc']:.4f} (best, epoch {best['epoch']}; last {val[-1]['val/auc']:.4f})"
    )
    print(f"val/n          {int(best['val/n'])} images")
    if perf:
        print(f"train img/s    {sorted(perf)[len(perf) // 2]:.1f} (median over log intervals)")
    hidden = _hidden_test_auc(run)
    if hidden is not None:
        print(f"test auc       {hidden:.4f} (submission.csv scored with the synthetic set's hidden labels)")
    for label, rel in [
        ("config", "config.yaml"),
        ("metrics", "metrics.jsonl"),
        ("tensorboard", "tb"),
        ("checkpoints", "checkpoints"),
        ("submission", "submission.csv"),
    ]:
        path = run / rel
        print(f"{label:<14} {path}{'' if path.exists() else '  (missing)'}")
    print(f"view curves:   tensorboard --logdir {run / 'tb'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invasive-dist", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic data set in the Kaggle layout")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-train", type=int, default=2295)
    s.add_argument("--n-test", type=int, default=1531)
    s.add_argument("--size", type=_size, default=(1154, 866), help="WIDTHxHEIGHT (default 1154x866)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1, help="processes (the result does not depend on it)")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("check-data", help="check a data folder; exit 0 only when it is usable")
    s.add_argument("--data", required=True)
    s.add_argument("--labels-csv", default="train_labels.csv")
    s.set_defaults(fn=cmd_check_data)

    s = sub.add_parser("eda", help="class balance, sample grids and a summary as files")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--labels-csv", default="train_labels.csv")
    s.set_defaults(fn=cmd_eda)

    s = sub.add_parser("train", help="train one fold (torchrun/accelerate/Slurm compatible)")
    s.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("predict", help="write submission.csv for a data folder's test images")
    # --run-dir: under torchrun, whose own parser takes --run for an abbreviation of its --run-path.
    s.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="a training run, or a CV directory (fold<k>/ runs of invasive-dist cv)",
    )
    s.add_argument("--data", required=True, help="data folder with test/ and sample_submission.csv")
    s.add_argument("--out", default=None, help="submission path (default RUN/submission.csv)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. predict.tta=dihedral")
    s.set_defaults(fn=cmd_predict)
    from . import analysis, bench, cv

    cv.add_subcommand(sub)
    analysis.add_subcommand(sub)
    bench.add_subcommand(sub)

    s = sub.add_parser("report", help="summarize a finished run: val AUC and where its outputs are")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"invasive-dist {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Preempted:
        return EXIT_PREEMPTED
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
