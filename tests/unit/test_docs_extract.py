"""The docs test's own parts, fast and in one process: the command extractor, and every command of
README.md, launch/README.md, docs/*.md and the configs' headers parsed by its program's parser
(flags, config keys; nothing is trained). The slow half, executing them: tests/integration/
test_docs_commands.py; the extractor and parsers: tests/docs_commands.py."""

from __future__ import annotations

import re
import shlex

import pytest

from .. import docs_commands
from ..docs_commands import PAGES, ROOT, Command, commands, parse


def test_extractor_finds_commands_and_honours_the_skip_mark(tmp_path, monkeypatch):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n```bash\ninvasive-dist check-data --data DATA   # comment\n"
        "torchrun --standalone \\\n    -m invasive_dist predict --run-dir r --data d && echo done\n```\n"
        "<!-- docs-test: skip (an excerpt) -->\n```bash\nnot-a-command --x\n```\n"
        "```\nplain block\n```\n```bash\npython - <<'EOF'\nprint(1)\nEOF\n```\n"
    )
    monkeypatch.setattr(docs_commands, "ROOT", tmp_path)
    cmds = commands("p.md")
    assert [c.argv[0] for c in cmds] == ["invasive-dist", "torchrun", "echo", "python"]
    assert cmds[0].argv == ["invasive-dist", "check-data", "--data", "DATA"] and cmds[0].line == 3
    assert cmds[1].argv[-4:] == ["--run-dir", "r", "--data", "d"]
    assert cmds[3].stdin == "print(1)\n"


def test_every_page_has_commands():
    for page in ("README.md", "launch/README.md", "docs/kaggle-workflow.md", "docs/when-things-go-wrong.md"):
        assert len(commands(page)) >= 2, page


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
