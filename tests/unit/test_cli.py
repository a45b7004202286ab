"""The command line as a user meets it: help, version, launcher-safe flags, override hints, the
resolved config, and what a second run into the same folder does."""

from __future__ import annotations

import argparse

import pytest

from invasive_dist import __version__
from invasive_dist.cli import build_parser, main
from invasive_dist.metrics import read_metrics
from tests.conftest import FAST_TRAIN


def _options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """command -> the first (documented) option string of each of its options."""
    sub = parser._subparsers._group_actions[0].choices
    return {
        name: [a.option_strings[0] for a in p._actions if a.option_strings and a.dest != "help"]
        for name, p in sub.items()
    }


def test_every_option_passes_through_torchrun_and_accelerate_launch():
    """torchrun's parser reads every argument (`--run` is an abbreviation of its --run-path);
    each command's documented options must reach invasive_dist unchanged under both launchers."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    torchrun, accelerate = get_args_parser(), launch_command_parser()
    for command, options in _options(build_parser()).items():
        tail = [command]
        for opt in options:
            tail += [opt, "x"]
        tail.append("train.epochs=3")
        a = torchrun.parse_args(["--standalone", "--nproc_per_node=2", "-m", "invasive_dist", *tail])
        b = accelerate.parse_args(["--num_processes", "2", "-m", "invasive_dist", *tail])
        assert a.training_script_args == tail and b.training_script_args == tail, command
    # why --run-dir comes first: torchrun rejects --run
    with pytest.raises(SystemExit):
        torchrun.parse_args(["--standalone", "-m", "invasive_dist", "predict", "--run", "r"])


def test_version_and_help_with_defaults_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and f"invasive-dist {__version__}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = capsys.readouterr().out
    assert "(default: 2295)" in out and "(default: 1154x866)" in out
    assert "Example:\n  invasive-dist synth --out" in out
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "--run-dir RUN_DIR" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["train", "--train.epochs=3"], "train.epochs=3"),
        (["predict", "--run-dir", "r", "--data", "d", "--tta", "dihedral"], "predict.tta=dihedral"),
    ],
)
def test_dashed_config_key_points_at_the_override(capsys, argv, hint):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"invasive-dist {argv[0]}: error: unrecognized arguments" in err  # the command's usage
    assert f"key.path=value without dashes, e.g. {hint}" in err


def test_config_prints_resolved_config_with_comments(capsys):
    assert main(["config", "--config", "configs/demo.yaml", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config: configs/demo.yaml optim.lr=1e-3" in out
    assert any(
        line.strip().startswith("lr: 0.001") and "peak learning rate" in line for line in out.splitlines()
    )
    assert main(["config", "model.arch=resnet19"]) == 2
    assert "command-line override 'model.arch=resnet19'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eda", "check-data"])
def test_missing_data_folder_is_named(tmp_path, capsys, command):
    argv = [command, "--data", str(tmp_path / "nope")] + (
        ["--out", str(tmp_path / "o")] if command == "eda" else []
    )
    assert main(argv) == 2
    assert f"--data {tmp_path / 'nope'}: the folder does not exist" in capsys.readouterr().err


def test_second_fresh_run_refuses_and_finished_run_says_complete(tmp_path, tiny_data, capsys):
    """Without resume, a second run into the same folder would mix metrics, tb/ and checkpoints."""
    args = ["train", *FAST_TRAIN, f"data.root={tiny_data}", f"output.root={tmp_path}", "output.name=r"]
    args += ["train.epochs=1"]  # one epoch is enough to leave a run behind
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best val/auc" in out and "at epoch 1 of 1 trained" in out
    assert "1 per device x 1 process x" not in out  # 8 per device here; the wording is checked below
    assert "x 1 process x 1 accumulation" in out
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=auto" in err and "output.name=r-2" in err
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics  # nothing was appended
    assert main([*args, "resume=auto"]) == 0
    assert "is already complete (1/1 epochs)" in capsys.readouterr().out


def test_report_summarises_one_run_of_a_mixed_folder(tmp_path, capsys):
    """A folder two runs wrote before runs refused to mix: the last run's figures, with a note."""
    import json

    rows = [
        {"step": 4, "epoch": 1, "val/auc": 0.9, "val/n": 16},
        {"step": 8, "epoch": 2, "val/auc": 0.95, "val/n": 16},
        {"step": 4, "epoch": 1, "val/auc": 0.7, "val/n": 16},
        {"step": 8, "epoch": 2, "val/auc": 0.8, "val/n": 16},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "holds 2 runs (the step count restarts at line 3)" in out
    assert "val/auc        0.8000 (best, epoch 2; last 0.8000)" in out


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path, tiny_data, capsys):
    """Issue 20: the newest step file (last.pt's) cut short, an older intact one kept: resume=auto
    (as every torchrun restart) continues from the older one and names the one it skipped."""
    args = ["train", *FAST_TRAIN, f"data.root={tiny_data}", f"output.root={tmp_path}", "output.name=r"]
    args += ["checkpoint.every_steps=2"]  # 6 steps per epoch: step files 2, 4, 6; keep_last keeps 4 and 6
    assert main([*args, "train.epochs=1"]) == 0
    ckpt = tmp_path / "r" / "checkpoints"
    with open(ckpt / "step-00000006.pt", "r+b") as f:
        f.truncate(100)  # a full disk or a copy cut short; last.pt is the same file
    capsys.readouterr()
    assert main([*args, "resume=auto"]) == 0
    out, err = capsys.readouterr()
    assert f"skipping {ckpt / 'last.pt'} (= step-00000006.pt): it cannot be loaded" in err
    assert f"resumed from {ckpt / 'step-00000004.pt'} at epoch 0 step 4" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "r") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # steps 5-6 trained again, logged once


def test_resume_auto_with_another_model_into_a_crashed_runs_folder_is_refused_by_name(tmp_path, capsys):
    """Issue 24 item 3: a resnet34 run died before its first checkpoint; `resume=auto` with resnet18
    started from scratch there and mixed both runs' files. Now it is refused, naming the key, and
    the folder is left as it was."""
    from invasive_dist.config import load_config, save_config

    run = tmp_path / "r"
    base = [f"output.root={tmp_path}", "output.name=r", "data.root=nowhere"]
    save_config(load_config("configs/demo.yaml", [*base, "model.arch=resnet34"]), run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 10, "epoch": 1, "train/loss": 0.7}\n')
    before = {p.name: p.read_text() for p in run.iterdir()}
    assert main(["train", "--config", "configs/demo.yaml", *base, "model.arch=resnet18"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "no checkpoint to continue" in err and "resume=auto" not in err
    assert main(["train", "--config", "configs/demo.yaml", *base, "model.arch=resnet18", "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert (
        "config.yaml does not match this run's settings: model.arch=resnet18 (the run has resnet34)." in err
    )
    assert {p.name: p.read_text() for p in run.iterdir()} == before


def test_train_without_config_says_it_uses_the_defaults(tmp_path, capsys):
    """Issue 24: `train` without --config trained on the built-in defaults without a word."""
    assert main(["train", f"data.root={tmp_path / 'none'}", f"output.root={tmp_path}"]) == 2
    assert "no --config: training with the built-in defaults" in capsys.readouterr().out
    assert main(["train", "--config", "configs/demo.yaml", f"data.root={tmp_path / 'none'}"]) == 2
    assert "built-in defaults" not in capsys.readouterr().out


def test_report_into_a_closed_pipe_ends_quietly(tmp_path):
    """Issue 24: `invasive-dist report | head` ended in a BrokenPipeError traceback. The reader here
    is gone before the first line (as `| head -0`), so every write fails."""
    import json
    import subprocess
    import sys

    rows = [{"step": 4, "epoch": 1, "val/auc": 0.9, "val/n": 16, "perf/img_per_s": 10.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.Popen(
        [sys.executable, "-m", "invasive_dist", "report", "--run-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141  # 128 + SIGPIPE, as a shell tool killed by it
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_sigterm_while_the_error_is_being_written_does_not_swallow_it(tmp_path):
    """CI (tests/cluster, the rendezvous host killed): node2's workers had failed on the lost peer
    and were writing their message when torchrun, which had lost its store too, sent them SIGTERM;
    the trainer had restored SIGTERM's default action on its way out, so they died without a word
    and the node printed no error line. Here the SIGTERM arrives at the same point, from the
    process itself, between claiming the node's report and printing it."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from invasive_dist import cli\n"
        "def claim(kind):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return True\n"
        "cli.claim_report = claim\n"
        f"sys.exit(cli.main(['eda', '--data', {str(tmp_path / 'nope')!r}, '--out', {str(tmp_path / 'o')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "the folder does not exist" in proc.stderr


def test_an_error_leaves_the_callers_sigterm_handler_as_it_was(tmp_path, capsys):
    """The hold above lasts while the message is written: a script that calls main() keeps its
    own SIGTERM handling afterwards (an ignored SIGTERM would also pass to every child it starts)."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    assert main(["eda", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert {s: signal.getsignal(s) for s in before} == before
    assert "the folder does not exist" in capsys.readouterr().err
