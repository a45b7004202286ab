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
``test_doc_commands_parse`` (fast) parses everything; ``test_doc_commands_run`` (slow) executes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "README.md",
    "launch/README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\b")
FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)(.*)$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}

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
EXTERNAL = {
    "git", "cd", "pip", "sudo", "apt-get", "kaggle", "unzip", "7z", "rm", "mkdir", "source", "head",
    "tail", "cat", "ls", "echo", "export", "tensorboard", "kill", "scancel", "scontrol", "squeue",
    "sinfo", "srun", "nvidia-smi", "watch", "du", "df", "nsys", "ncu", "perfetto", "htop", "top",
}  # fmt: skip
DATA_TOKENS = re.compile(
    r"(^|=)(\$HOME/data/invasive|\$DATA|/data/invasive|data/invasive|data/synthetic|DATA)$"
)
# Commands the docs show that do not exit 0 here, each with the reason and what its output must say.
EXPECTED: dict[str, tuple[int, str]] = {}  # command as written -> (exit status, text in its output)


@dataclass
class Command:
    page: str
    line: int
    text: str  # as written (continuations joined, comment removed)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None  # a heredoc

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def shell_blocks(page: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each shell block of ``page`` not marked ``docs-test: skip``."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        skipped = i > 0 and SKIP_MARK.search(lines[i - 1])
        if m.group(2) in SHELL_LANGS and not skipped:
            blocks.append((i + 2, [line[len(m.group(1)) :] for line in lines[i + 1 : j]]))
        i = j + 1
    return blocks


def commands(page: str) -> list[Command]:
    """The page's commands: continuation lines joined, ``&&``/``;``/``|`` split, heredocs kept."""
    out = []
    for start, lines in shell_blocks(page):
        k = 0
        while k < len(lines):
            line_no, text = start + k, lines[k]
            while text.rstrip().endswith("\\") and k + 1 < len(lines):
                k += 1
                text = text.rstrip()[:-1] + " " + lines[k].strip()
            k += 1
            heredoc = re.search(r"<<-?\s*'?(\w+)'?", text)
            body = None
            if heredoc:
                end = next(i for i in range(k, len(lines)) if lines[i].strip() == heredoc.group(1))
                body = "\n".join(lines[k:end]) + "\n"
                k = end + 1
                text = text[: heredoc.start()]
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError as e:
                raise AssertionError(f"{page}:{line_no}: not valid shell ({e}): {text}") from None
            for part, piped in _split(tokens):
                env = {}
                while part and re.match(r"^[A-Z_][A-Z0-9_]*=", part[0]):
                    key, _, value = part.pop(0).partition("=")
                    env[key] = value
                if part:
                    out.append(Command(page, line_no, shlex.join(part), part, env, None if piped else body))
    return out


def _split(tokens: list[str]) -> list[tuple[list[str], bool]]:
    """Split at ``&&``, ``||``, ``;`` and ``|``; True for a command that reads a pipe."""
    parts, cur, piped = [], [], False
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            parts.append((cur, piped))
            cur, piped = [], t == "|"
        else:
            cur.append(t)
    parts.append((cur, piped))
    return [(p, piped) for p, piped in parts if p]


# ------------------------------------------------------------------------------------------------
# Substitutions and classification


def substitute(argv: list[str], data: Path) -> list[str]:
    out = []
    for t in argv:
        t = DATA_TOKENS.sub(lambda m: m.group(1) + str(data), t)
        t = t.replace("runs/resnext101_8gpu", "runs/resnet50_kaggle").replace("C.yaml", "configs/demo.yaml")
        out.append(t)
    return out


def newest_step(arg: str, cwd: Path) -> str:
    """``resume=runs/demo/checkpoints/step-00001200.pt``: the step file this run has."""
    m = re.search(r"([^=\s]*/)step-\d{8}\.pt", arg)
    if not m:
        return arg
    steps = sorted((cwd / m.group(1)).glob("step-*.pt"))
    return arg.replace(m.group(0), f"{m.group(1)}{steps[-1].name}") if steps else arg


def kind(cmd: Command) -> str:
    a = cmd.argv
    if a[0] == "invasive-dist" or a[:3] == ["python", "-m", "invasive_dist"]:
        return "cli"
    if a[0] == "torchrun" or a[:2] == ["accelerate", "launch"]:
        return "launcher"
    if a[0] in ("launch/train.sh", "launch/predict.sh"):
        return "launch-script"
    if a[0] == "sbatch":
        return "sbatch"
    if a[0] == "make":
        return "make"
    if a[0] in ("python", "python3") and (a[1:2] == ["-c"] or a[1:2] == ["-"]):
        return "python"
    if a[0] in EXTERNAL:
        return "external"
    raise AssertionError(
        f"{cmd}: the docs test does not know `{a[0]}`: add it to EXTERNAL in {Path(__file__).name} if it is "
        "not this project's, or mark the block with <!-- docs-test: skip (why) --> above its fence"
    )


def cli_args(argv: list[str]) -> list[str]:
    return argv[1:] if argv[0] == "invasive-dist" else argv[3:]


def launcher_script_args(argv: list[str]) -> list[str]:
    """Parse the launcher part with the launcher's own parser; return invasive_dist's arguments."""
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(argv[1:])
    else:
        from accelerate.commands.launch import launch_command_parser

        ns = launch_command_parser().parse_args(argv[2:])
        assert (ROOT / ns.config_file).is_file(), f"{ns.config_file} does not exist"
    assert ns.module and ns.training_script == "invasive_dist", argv
    return list(ns.training_script_args)


def parse_cli(args: list[str]) -> None:
    """argparse, and for commands that take a config: the config with its overrides loads."""
    from invasive_dist.cli import build_parser
    from invasive_dist.config import load_config

    ns = build_parser().parse_args(args)
    if getattr(ns, "config", None) is not None or ns.command in ("train", "config"):
        config = ROOT / ns.config if ns.config else None
        load_config(config, [o for o in ns.overrides if not o.startswith("resume=")])


def parse_sbatch(argv: list[str], data: Path) -> None:
    script_at = next(i for i, t in enumerate(argv) if t.endswith(".sbatch"))
    script = ROOT / argv[script_at]
    assert script.is_file(), f"{script} does not exist"
    subprocess.run(["bash", "-n", str(script)], check=True)
    rest = substitute(argv[script_at + 1 :], data)
    if script.name == "predict.sbatch":
        from invasive_dist.cli import build_parser

        build_parser().parse_args(["predict", *rest])
    else:
        from invasive_dist.config import load_config

        load_config(ROOT / rest[0], rest[1:])


# ------------------------------------------------------------------------------------------------
# Tests


def test_extractor_finds_commands_and_honours_the_skip_mark(tmp_path, monkeypatch):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n```bash\ninvasive-dist check-data --data DATA   # comment\n"
        "torchrun --standalone \\\n    -m invasive_dist predict --run-dir r --data d && echo done\n```\n"
        "<!-- docs-test: skip (an excerpt) -->\n```bash\nnot-a-command --x\n```\n"
        "```\nplain block\n```\n```bash\npython - <<'EOF'\nprint(1)\nEOF\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    cmds = commands("p.md")
    assert [c.argv[0] for c in cmds] == ["invasive-dist", "torchrun", "echo", "python"]
    assert cmds[0].argv == ["invasive-dist", "check-data", "--data", "DATA"] and cmds[0].line == 3
    assert cmds[1].argv[-4:] == ["--run-dir", "r", "--data", "d"]
    assert cmds[3].stdin == "print(1)\n"


def test_every_page_has_commands():
    for page in ("README.md", "launch/README.md", "docs/kaggle-workflow.md", "docs/when-things-go-wrong.md"):
        assert len(commands(page)) >= 2, page


def parse(cmd: Command, data: Path) -> None:
    """Parse ``cmd`` the way its program will (nothing is run); AssertionError naming it if rejected."""
    k = kind(cmd)
    argv = substitute(cmd.argv, data)
    try:
        if k == "cli":
            parse_cli(cli_args(argv))
        elif k == "launcher":
            parse_cli(launcher_script_args(argv))
        elif k == "sbatch":
            parse_sbatch(cmd.argv, data)
        elif k == "make":
            subprocess.run(["make", "-n", "-C", str(ROOT), *argv[1:]], check=True, capture_output=True)
    except SystemExit as e:
        raise AssertionError(f"{cmd}: rejected by its parser (exit {e.code})") from None
    except Exception as e:
        raise AssertionError(f"{cmd}: {type(e).__name__}: {e}") from None


@pytest.mark.parametrize("page", PAGES)
def test_doc_commands_parse(page, tiny_data):
    """Every command's flags and config keys are accepted (fast: nothing is trained)."""
    for cmd in commands(page):
        parse(cmd, tiny_data)


CONFIG_HEADER_CMD = re.compile(r"^#\s+((?:invasive-dist|torchrun|accelerate launch|sbatch) .*?)(?:\s+#.*)?$")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_config_header_commands_parse(config, tiny_data):
    """The commands a config's header comment shows (``#   invasive-dist cv --config ...``) parse."""
    found = 0
    for i, line in enumerate((ROOT / "configs" / config).read_text().splitlines(), start=1):
        m = CONFIG_HEADER_CMD.match(line)
        if m:
            argv = shlex.split(m.group(1))
            parse(Command(f"configs/{config}", i, m.group(1), argv), tiny_data)
            found += 1
    assert found, f"configs/{config}: its header shows no command"


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
