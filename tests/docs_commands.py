"""The shell commands of README.md, launch/README.md and docs/*.md: found, classified and parsed.

Shared by tests/unit/test_docs_extract.py (the extractor itself, and every command parsed by its
program's own parser: fast, in one process) and tests/integration/test_docs_commands.py (what runs
on one CPU, executed). What happens to each kind of command: that module's docstring.

    for cmd in commands("README.md"):
        parse(cmd, data)  # AssertionError naming the page, line and command if its parser rejects it
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "launch/README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\b")
FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)(.*)$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}

EXTERNAL = {
    "git", "cd", "pip", "sudo", "apt-get", "kaggle", "unzip", "7z", "rm", "mkdir", "source", "head",
    "tail", "cat", "ls", "echo", "export", "tensorboard", "kill", "scancel", "scontrol", "squeue",
    "sinfo", "srun", "nvidia-smi", "watch", "du", "df", "nsys", "ncu", "perfetto", "htop", "top",
}  # fmt: skip
DATA_TOKENS = re.compile(
    r"(^|=)(\$HOME/data/invasive|\$DATA|/data/invasive|data/invasive|data/synthetic|DATA)$"
)


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
