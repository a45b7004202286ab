"""One entry point: ``invasive-dist <command>`` (also ``python -m invasive_dist <command>``).

    invasive-dist synth --out data/synthetic --n-train 300 --size 384x288
    invasive-dist check-data --data data/synthetic
    invasive-dist eda --data data/synthetic --out runs/eda
    invasive-dist train --config configs/demo.yaml train.epochs=3 model.arch=resnet34
    invasive-dist predict --run-dir runs/demo --data data/synthetic
    invasive-dist config --config configs/demo.yaml optim.lr=1e-3   # the resolved config, commented

``train`` and ``predict`` run unchanged under python, torchrun, accelerate launch and Slurm. The run
directory is ``--run-dir`` everywhere: torchrun's own parser reads every argument and rejects ``--run``
as an ambiguous abbreviation of its ``--run-path`` (``--run`` still works without a launcher).
User errors print one message and exit 2; a run stopped by SIGTERM/SIGUSR1 saves and exits 143.

Every command's parser is declared here, in ``build_parser`` (one place for flags, help texts and
``EXAMPLES``); each sets ``fn``, the command's ``cmd_*(args) -> exit status``: the small ones are
below, ``cmd_cv``, ``cmd_analyze`` and ``cmd_bench`` live in their modules. A new command adds
its parser to ``build_parser`` and its example to ``EXAMPLES``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import torch.distributed as dist
import yaml

from . import __version__
from .analysis import cmd_analyze, cv_report
from .bench import cmd_bench
from .checkpoint import Checkpointer, FencedOut, refuse_mixed_run
from .config import Config, describe, field_comments, load_config
from .cv import cmd_cv
from .data import BACKENDS
from .data.check import check_data
from .data.synth import synthesize
from .distributed import (
    EXIT_PEER_LOST,
    accelerator_from_env,
    claim_report,
    is_peer_failure,
    peer_failure_message,
    record_exit,
)
from .eda import run_eda
from .errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError
from .metrics import read_metrics, roc_auc
from .predict import is_cv_dir, load_run_config, predict_run
from .train import Trainer, build_parts, resume_source

# Shown under each command's --help.
EXAMPLES = {
    "synth": "invasive-dist synth --out data/synthetic --n-train 300 --n-test 100 --size 384x288",
    "check-data": "invasive-dist check-data --data data/synthetic",
    "eda": "invasive-dist eda --data data/synthetic --out runs/eda",
    "train": "invasive-dist train --config configs/demo.yaml train.epochs=3 optim.lr=1e-3\n"
    "  torchrun --standalone --nproc_per_node=8 -m invasive_dist train --config configs/resnet50_kaggle.yaml",
    "predict": "invasive-dist predict --run-dir runs/demo --data data/synthetic predict.tta=dihedral\n"
    "  torchrun --standalone --nproc_per_node=8 -m invasive_dist predict --run-dir runs/demo --data DATA",
    "config": "invasive-dist config --config configs/demo.yaml train.epochs=3",
    "cv": "invasive-dist cv --config configs/resnet50_kaggle.yaml data.root=DATA\n"
    "  invasive-dist cv --collect --run-dir runs/resnet50_kaggle",
    "analyze": "invasive-dist analyze --run-dir runs/demo --threshold youden",
    "bench": "invasive-dist bench --config configs/demo.yaml --backend torch --steps 10",
    "report": "invasive-dist report --run-dir runs/demo",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each option's default shown unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default != argparse.SUPPRESS
            and "default" not in text
        ):
            shown = "x".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1154x866") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"--size {text!r}: width and height must be >= 16")
    return w, h


def cmd_synth(args) -> int:
    summary = synthesize(
        Path(args.out),
        n_train=args.n_train,
        n_test=args.n_test,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        flowers=args.flowers,
        difficulty=args.difficulty,
    )
    print(summary.format())
    return 0


def _data_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(
            f"--data {text}: the folder {what} (a data folder holds train/, test/ and train_labels.csv)"
        )
    return path


def cmd_check_data(args) -> int:
    report = check_data(_data_dir(args.data), args.labels_csv)
    print(report.format())
    return 0 if report.ok else 1


def cmd_eda(args) -> int:
    summary = run_eda(_data_dir(args.data), Path(args.out), labels_csv=args.labels_csv)
    print(json.dumps(summary, indent=2))
    print(f"EDA written to {args.out}")
    return 0


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    acc, world = accelerator_from_env(cfg)
    if args.config is None and acc.is_main_process:
        print(
            "no --config: training with the built-in defaults (invasive-dist config prints them; "
            "configs/*.yaml are the shipped recipes)",
            flush=True,
        )
    # Refuse a second run into a run's folder before the data check and the model build (the
    # Trainer checks again); a restarted worker or requeued job resumes, as Trainer.fit does.
    refuse_mixed_run(cfg.run_dir, resume_source(cfg, world), acc, cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, acc, world, build_parts(cfg, acc, world))
        result = trainer.fit()
    except KeyboardInterrupt:
        if acc.is_main_process:
            step = None if trainer is None else trainer.global_step
            print(
                interrupted_line(cfg, args, step, launched=world.world_size > 1), file=sys.stderr, flush=True
            )
        raise
    if acc.is_main_process:
        if result.steps_run == 0 and result.epoch >= cfg.train.epochs:
            print(
                f"{cfg.run_dir} is already complete ({result.epoch}/{cfg.train.epochs} epochs): "
                f"nothing to train. A new run: output.name=<new name>; its outputs: "
                f"invasive-dist report --run-dir {cfg.run_dir}"
            )
        print(_best_line(cfg.run_dir, result.epoch))
    return 0


def _best_row(val: list[dict]) -> dict:
    """The epoch the Trainer kept as best (``val/is_best``; AUC ties go to the lower loss), or
    the highest val/auc in metrics written before that flag existed."""
    flagged = [r for r in val if r.get("val/is_best")]
    return flagged[-1] if flagged else max(val, key=lambda r: r["val/auc"])


def _source(row: dict) -> str:
    """With EMA on (``val/ema`` logged): which weights the epoch's val/auc came from."""
    return "" if "val/ema" not in row else f", {'ema' if row['val/ema'] else 'raw'} weights"


def interrupted_line(cfg: Config, args, step: int | None, launched: bool = False) -> str:
    """What Ctrl-C left behind and the command that continues: one line."""
    at = "before training started" if step is None else f"at step {step}"
    newest = Checkpointer(cfg.run_dir / "checkpoints").newest()
    if newest is None:
        saved = "no checkpoint yet, the run starts again from step 0"
    else:
        path, saved_step = newest
        redo = f", steps {saved_step + 1}-{step} will be trained again" if step and step > saved_step else ""
        saved = f"the last checkpoint is {path} (step {saved_step}){redo}"
    command = ["invasive-dist", "train", *(["--config", args.config] if args.config else [])]
    command += [o for o in args.overrides if not o.startswith("resume=")] + ["resume=auto"]
    how = "the same launcher and " if launched else ""
    return (
        f"interrupted (Ctrl-C) {at}, not saved: {saved}. Continue with {how}{shlex.join(command)} "
        "(kill -TERM instead of Ctrl-C saves first)"
    )


def _best_line(run_dir: Path, epochs: int) -> str:
    """``best val/auc 0.9941 at epoch 2 of 8; ...`` from the run's metrics (one run per folder)."""
    val = [r for r in read_metrics(run_dir) if "val/auc" in r]
    if not val:
        return f"no validation result yet; run directory {run_dir}"
    best = _best_row(val)
    return (
        f"best val/auc {best['val/auc']:.4f} at epoch {best['epoch']} of {epochs} trained{_source(best)}; "
        f"run directory {run_dir}"
    )


def cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(f"# resolved config: {args.config or 'defaults'}" + "".join(f" {o}" for o in args.overrides))
    print(describe(cfg), end="")
    return 0


def cmd_predict(args) -> int:
    cfg = load_run_config(Path(args.run), args.overrides)
    data = _data_dir(args.data)
    acc, _ = accelerator_from_env(cfg)
    out = predict_run(Path(args.run), data, acc, Path(args.out) if args.out else None, tuple(args.overrides))
    if acc.is_main_process:
        print(f"wrote {out}")
    return 0


def _hidden_test_auc(run: Path) -> float | None:
    """A synthetic set keeps its test labels in test_labels_hidden.csv: score the submission."""
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
    run = Path(args.run)
    if is_cv_dir(run):
        print(cv_report(run))
        return 0
    rows = read_metrics(run)
    # A folder written before runs refused to mix may hold several runs: summarise the last one.
    starts = [i for i in range(1, len(rows)) if rows[i].get("step", 0) < rows[i - 1].get("step", 0)]
    if starts:
        print(
            f"note: {run}/metrics.jsonl holds {len(starts) + 1} runs (the step count restarts at line "
            f"{starts[-1] + 1}); this summarises the last one"
        )
        rows = rows[starts[-1] :]
    val = [r for r in rows if "val/auc" in r]
    if not val:
        raise UserError(f"{run}/metrics.jsonl has no validation results: is {run} a finished training run?")
    best = _best_row(val)
    perf = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r]
    print(f"run            {run}")
    print(
        f"val/auc        {best['val/auc']:.4f} (best, epoch {best['epoch']}{_source(best)}; "
        f"last {val[-1]['val/auc']:.4f})"
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
    p = _Parser(
        prog="invasive-dist",
        description=__doc__.split("\n")[0],
        epilog="Examples:\n  "
        + "\n  ".join(EXAMPLES[c].split("\n")[0] for c in ("synth", "train", "predict"))
        + "\nEach command's options: invasive-dist COMMAND --help",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic data set in the Kaggle layout")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-train", type=int, default=2295, help="labelled train images")
    s.add_argument("--n-test", type=int, default=1531, help="test images")
    s.add_argument("--size", type=_size, default=(1154, 866), help="WIDTHxHEIGHT")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    s.add_argument("--workers", type=int, default=1, help="processes (the result does not depend on it)")
    s.add_argument("--flowers", choices=("anywhere", "edges"), default="anywhere", help="flower heads")
    s.add_argument(
        "--difficulty",
        choices=("easy", "hard"),
        default="easy",
        help="hard: small, hidden, washed-out flower heads among look-alikes (docs/model-quality.md)",
    )
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("check-data", help="check a data folder; exit 0 only when it is usable")
    s.add_argument("--data", required=True, help="data folder (train/, test/, train_labels.csv)")
    s.add_argument("--labels-csv", default="train_labels.csv", help="label file inside --data")
    s.set_defaults(fn=cmd_check_data)

    s = sub.add_parser("eda", help="class balance, sample grids and a summary as files")
    s.add_argument("--data", required=True, help="data folder (train/, test/, train_labels.csv)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--labels-csv", default="train_labels.csv", help="label file inside --data")
    s.set_defaults(fn=cmd_eda)

    s = sub.add_parser("train", help="train one fold (torchrun/accelerate/Slurm compatible)")
    s.add_argument("--config", default=None, help="YAML config (configs/*.yaml; default: built-in defaults)")
    s.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. train.epochs=3"
    )
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("predict", help="write submission.csv for a data folder's test images")
    # --run-dir first: under torchrun, whose own parser takes --run for an abbreviation of its --run-path.
    s.add_argument(
        "--run-dir",
        "--run",
        dest="run",
        metavar="RUN_DIR",
        required=True,
        help="a training run, or a CV directory (fold<k>/ runs of invasive-dist cv)",
    )
    s.add_argument("--data", required=True, help="data folder with test/ and sample_submission.csv")
    s.add_argument("--out", default=None, help="submission path (default RUN_DIR/submission.csv)")
    s.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. predict.tta=dihedral"
    )
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser(
        "config", help="print the resolved config (file + overrides), each key with its comment"
    )
    s.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    s.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. optim.lr=1e-3"
    )
    s.set_defaults(fn=cmd_config)

    s = sub.add_parser(
        "cv", help="k-fold cross-validation: train every fold, out-of-fold predictions, pseudo-labels"
    )
    s.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    s.add_argument(
        "--only-fold", type=int, default=None, metavar="K", help="train fold K only (Slurm arrays)"
    )
    s.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: score finished folds without oof.csv, write oof.csv/cv.json/roc.png",
    )
    s.add_argument(
        "--run-dir",  # first: torchrun's parser rejects --run (its --run-path)
        "--run",
        dest="run",
        default=None,
        help="with --collect: the CV directory (default from --config)",
    )
    s.add_argument("--data", default=None, help="with --collect: the data folder, if it moved since training")
    s.add_argument(
        "--pseudo-rounds",
        type=int,
        default=0,
        help="rounds retrained with pseudo-labelled test images (default 0)",
    )
    s.add_argument("--pseudo-low", type=float, default=0.05, help="test images with p <= this get label 0")
    s.add_argument("--pseudo-high", type=float, default=0.95, help="test images with p >= this get label 1")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 data.n_folds=5")
    s.set_defaults(fn=cmd_cv)

    s = sub.add_parser("analyze", help="ROC curve, confusion matrix and worst images of a run or CV dir")
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

    s = sub.add_parser(
        "bench", help="input pipeline vs training step vs both: what bounds the loop (writes bench.json)"
    )
    s.add_argument("--config", default=None, help="YAML config (e.g. configs/bench_r50.yaml)")
    s.add_argument(
        "--backend",
        action="append",
        default=None,
        metavar="NAME[:KEY=VALUE,...]",
        help=f"data backend ({', '.join(('auto', *BACKENDS))}), optionally with data.* settings, "
        "e.g. dali:hw_decoder_load=1.0; repeat to compare (default: data.backend)",
    )
    s.add_argument(
        "--steps", type=int, default=30, help="measured steps of each window, at least (default 30)"
    )
    s.add_argument("--warmup", type=int, default=5, help="unmeasured steps before each figure (default 5)")
    s.add_argument(
        "--windows",
        type=int,
        default=1,
        help="timed windows per figure; the figure is their median, with their spread (default 1)",
    )
    s.add_argument(
        "--window-s",
        type=float,
        default=0.0,
        metavar="S",
        help="each window lasts at least S seconds as well as --steps steps (default 0)",
    )
    s.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        metavar="S",
        help="a backend row not expected to end within S seconds of the start is not run, and says so",
    )
    s.add_argument("--out", default=None, help="folder for bench.json (default: the run directory)")
    s.add_argument(
        "--summary",
        nargs="+",
        default=None,
        metavar="DIR",
        help="measure nothing: print the table of these runs' bench.json files (folders or files)",
    )
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.compile=true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("report", help="summarize a finished run: val AUC and where its outputs are")
    s.add_argument(
        "--run-dir", "--run", dest="run", metavar="RUN_DIR", required=True, help="a training run or a CV dir"
    )
    s.set_defaults(fn=cmd_report)
    for name, parser in sub.choices.items():
        if name in EXAMPLES:
            parser.epilog = "Example:\n  " + EXAMPLES[name]
    return p


def _version() -> str:
    parts = [f"invasive-dist {__version__}"]
    for dist_name in ("torch", "torchvision", "accelerate", "nvidia-dali-cuda130", "nvidia-dali-cuda120"):
        try:
            parts.append(f"{dist_name} {version(dist_name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def _unknown_option_hint(parser: argparse.ArgumentParser, extras: list[str], argv: list[str]) -> str:
    """``--train.epochs=3`` or ``--tta dihedral``: point at the key=value override that was meant."""
    keys: dict[str, list[str]] = {}  # last part -> dotted keys
    for section in dataclasses.fields(Config):
        sub = getattr(Config(), section.name)
        names = field_comments(type(sub)) if dataclasses.is_dataclass(sub) else {section.name: ""}
        for name in names:
            dotted = f"{section.name}.{name}" if dataclasses.is_dataclass(sub) else name
            keys.setdefault(name, []).append(dotted)
    hints = []
    for opt in extras:
        if not opt.startswith("--"):
            continue
        name, eq, value = opt[2:].partition("=")
        if not eq:
            i = argv.index(opt) if opt in argv else -1
            nxt = argv[i + 1] if 0 <= i < len(argv) - 1 else ""
            value = nxt if nxt and not nxt.startswith("-") else "VALUE"
        name = name.replace("-", "_")
        if "." in name:
            hints.append(f"{name}={value}")
        elif name in keys:
            hints.extend(f"{k}={value}" for k in keys[name])
    takes = any(a.dest == "overrides" for a in parser._actions)
    if hints and takes:
        return f"; config keys are set as key.path=value without dashes, e.g. {' or '.join(hints)}"
    return ""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is reported by its command, with the override meant."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        sub.error(f"unrecognized arguments: {' '.join(extras)}{_unknown_option_hint(sub, extras, argv)}")
    return args


def _continue_hint(args) -> tuple[str, str]:
    """(the last checkpoint in words, the command that continues) for a run that lost a peer."""
    if args.command != "train":
        return "", f"run the same command again (invasive-dist {args.command} ...)."
    overrides = [o for o in args.overrides if not o.startswith("resume=")]
    ckpt_line = ""
    try:
        cfg = load_config(args.config, overrides)
        newest = Checkpointer(cfg.run_dir / "checkpoints").newest()
        ckpt_line = (
            f"The last intact checkpoint is {newest[0]} (step {newest[1]})."
            if newest
            else f"No checkpoint was saved yet in {cfg.run_dir}: resume=auto starts the run over."
        )
    except UserError:
        pass
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) + 1
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    if restart <= max_restarts:  # torchrun --max-restarts: the command below is the fallback
        ckpt_line += (
            f" torchrun now restarts this node's workers (restart {restart} of {max_restarts}): with "
            "--nnodes MIN:MAX the nodes still up re-form the job and resume from it by themselves, "
            "unless the lost host was the one that hosts the rendezvous (--master): then the job ends."
        )
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "1")
    # Fewer processes keep the global batch only with the accumulation derived (elastic resume).
    auto = [] if "train.grad_accum=auto" in overrides else ["train.grad_accum=auto"]
    cmd = shlex.join(
        ["launch/train.sh", "-n", per_node, args.config or "CONFIG", *overrides, *auto, "resume=auto"]
    )
    return (
        ckpt_line,
        f"{cmd}  (here alone; on several nodes add --nnodes M --node-rank R --master HOST:PORT on each).",
    )


def _hold_stop_signals(held: dict) -> None:
    """This process ends with a message of its own (a user error, a lost peer): a SIGTERM now must
    not kill it before the message is out. torchrun sends one to the node's other workers as soon
    as one has failed, and the rendezvous host's loss makes it send one to all of them; the trainer
    has restored the default action (death, silently) on its way out, and writing the message
    reads the config and the checkpoints (tenths of a second). ``main`` restores the handlers in
    ``held`` when it returns (it is also called from Python: the caller keeps its SIGTERM)."""
    if threading.current_thread() is threading.main_thread() and not held:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            held[sig] = signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    code = None  # set when this process ends with a message of its own (told to the launcher)
    held: dict = {}  # the stop signals' handlers while the message is written
    try:
        code = args.fn(args)
        return code
    except UserError as e:
        _hold_stop_signals(held)
        # Every rank usually hits the same error: one message per node under the launch scripts.
        if claim_report("user-error"):
            print(f"invasive-dist {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
        return code
    except KeyboardInterrupt:
        code = 130
        return code
    except BrokenPipeError:  # `invasive-dist report | head`: the reader left; end quietly, as cat does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
    except Preempted:
        code = EXIT_PREEMPTED
        return code
    except FencedOut as e:  # thawed after another attempt took the run over: it keeps the folder
        _hold_stop_signals(held)
        print(f"invasive-dist {args.command}: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_PEER_LOST
        return code
    except Exception as e:
        if not (dist.is_available() and dist.is_initialized() and is_peer_failure(e)):
            raise  # a bug: its traceback
        _hold_stop_signals(held)
        if claim_report("peer-failure"):
            ckpt_line, command = _continue_hint(args)
            rank = dist.get_rank()
            msg = peer_failure_message(e, rank, getattr(e, "global_step", None), ckpt_line, command)
            print(f"invasive-dist {args.command}: error: {msg}", file=sys.stderr, flush=True)
        code = EXIT_PEER_LOST
        return code
    finally:
        if code is not None:
            record_exit(code)
        if dist.is_available() and dist.is_initialized():
            if code == EXIT_PEER_LOST:
                # destroy_process_group would wait on the lost peer; the process ends anyway.
                sys.stderr.flush()
                os._exit(code)
            dist.destroy_process_group()
        for sig, handler in held.items():
            signal.signal(sig, handler)
