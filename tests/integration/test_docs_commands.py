"""Every shell command of README.md, launch/README.md and docs/*.md, run as a user would run it.

The commands come from the fenced ``bash``/``sh``/``shell`` blocks of those pages, so a page cannot
drift from the code. What happens to each command:

- ``invasive-dist ...`` / ``python -m invasive_dist ...``: executed in a scratch folder (one per
  page, the page's commands in order, so a ``predict`` reads what the page's ``train`` wrote), with
  the tiny synthetic data set in place of ``DATA`` (and ``/data/invasive``, ``data/synthetic``, ...)
  and small sizes appended to ``train``/``cv``/``bench`` (:data:`SMALL`): 64 px ResNet-18, 1 epoch,
  2 folds, no downloads, no compile. Exit status 0 unless :data:`EXPECTED` says otherwise.
- ``torchrun ...`` and ``accelerate launch ...`` (GPUs, several processes): parsed by the
  launcher's own argument parser, then by this project's; a ``predict`` of a run the page trained is
  also executed in one process (what the page says to do on one GPU): later commands read its output.
- ``launch/train.sh``/``launch/predict.sh``: executed when they start one process on this machine
  (no ``-n``/``--nnodes``), else with ``--dry-run``. ``sbatch``: the script exists, ``bash -n``
  parses it, and its arguments parse (the config with its overrides loads). ``make X``: ``make -n X``.
- ``python -c ...`` and ``python - <<EOF`` snippets: executed. Tools that are not this project's
  (``kaggle``, ``pip``, ``tensorboard``, ``kill``, ...: :data:`EXTERNAL`) are not run.

The 8-GPU recipe's commands are parsed, not trained; commands that read its outputs
(``runs/resnext101_8gpu``) read the one-GPU recipe's (``runs/resnet50_kaggle``) instead.

A block that must not be executed or parsed (an excerpt of output, a template with placeholders)
is marked by an HTML comment on the line just above its fence; it does not show on the rendered page:

    <!-- docs-test: skip (why) -->

A command whose first word is in none of the lists fails the test with that advice.
The extractor and the parsers are in tests/docs_commands.py; ``test_doc_commands_parse`` (fast, in
tests/unit/test_docs_extract.py) parses everything; ``test_doc_commands_run`` (slow, here) executes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..docs_commands import (
    PAGES,
    ROOT,
    Command,
    cli_args,
    commands,
    kind,
    launcher_script_args,
    substitute,
)

# Appended to train/cv/bench: CPU-sized versions of the recipes (later overrides win).
SMALL = [
    "data.image_size=64",
    "data.batch_size=8",
    "data.n_folds=2",
    "data.backend=torch",
    "data.torch.num_workers=2",  # workers stay on; the recipes' 8 would cost 2 CI cores more start-up than work
    "train.epochs=1",
    "train.compile=false",
    "train.mixed_precision=no",
    "model.arch=resnet18",
    "model.weights=null",  # no download in tests
]
# Commands the docs show that do not exit 0 here, each with the reason and what its output must say.
EXPECTED: dict[str, tuple[int, str]] = {}  # command as written -> (exit status, text in its output)


def newest_step(arg: str, cwd: Path) -> str:
    """``resume=runs/demo/checkpoints/step-00001200.pt``: the step file this run has."""
    m = re.search(r"([^=\s]*/)step-\d{8}\.pt", arg)
    if not m:
        return arg
    steps = sorted((cwd / m.group(1)).glob("step-*.pt"))
    return arg.replace(m.group(0), f"{m.group(1)}{steps[-1].name}") if steps else arg


def _predicts_existing_run(args: list[str], cwd: Path) -> bool:
    """A launcher's ``predict`` of a run this page trained (round 2 of the 8-GPU recipe is only parsed)."""
    return args[:1] == ["predict"] and (cwd / args[args.index("--run-dir") + 1]).is_dir()


def _workdir(tmp_path: Path, data: Path) -> Path:
    """A checkout as `make demo` leaves it: the code, and the demo data at data/synthetic."""
    for name in ("configs", "launch", "slurm", "invasive_dist"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(data)
    return tmp_path


def _run(cmd: Command, argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(cwd),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        **cmd.env,
    }
    stdin = cmd.stdin.replace("runs/resnext101_8gpu", "runs/resnet50_kaggle") if cmd.stdin else None
    p = subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_doc_commands_run(page, tiny_data, tmp_path):
    """Execute what runs on one CPU, in the page's order (see the module docstring)."""
    cwd = _workdir(tmp_path, tiny_data)
    py = sys.executable
    ran = 0
    for cmd in commands(page):
        k = kind(cmd)
        argv = [newest_step(a, cwd) for a in substitute(cmd.argv, tiny_data)]
        if k == "cli" or (k == "launcher" and _predicts_existing_run(launcher_script_args(argv), cwd)):
            args = cli_args(argv) if k == "cli" else launcher_script_args(argv)
            small = SMALL if args[0] in ("train", "cv", "bench") and "--collect" not in args else []
            run = [py, "-m", "invasive_dist", *args, *small]
        elif k == "launch-script":
            one_process = not {"-n", "--nproc", "--gpus", "--nnodes"} & set(argv)
            if one_process and argv[0] == "launch/train.sh":
                run = ["bash", *argv, *SMALL]
            else:
                run = ["bash", argv[0], "--dry-run", *argv[1:]]
        elif k == "python":
            run = [py, *argv[1:]]
        else:
            continue  # parsed by test_doc_commands_parse, or not this project's
        t0 = time.perf_counter()
        rc, out = _run(cmd, run, cwd)
        print(f"{time.perf_counter() - t0:6.1f} s  exit {rc}  {cmd}")  # pytest -s shows the cost of each
        ran += 1
        want_rc, want_text = EXPECTED.get(cmd.text, (0, ""))
        assert rc == want_rc and want_text in out, (
            f"{cmd}\n  ran: {shlex.join(run)}\n  exit {rc}\n{out[-3000:]}"
        )
    if page in ("README.md", "docs/kaggle-workflow.md", "docs/when-things-go-wrong.md"):
        assert ran >= 3, f"{page}: only {ran} commands executed"
