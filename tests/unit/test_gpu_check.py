"""tests/gpu_check.sh's plan on a CPU: the order of its items, the budget's cuts and the lines that say
what was cut, with every item simulated (GPU_CHECK_SIMULATE: an item sleeps instead of running), so
that the logic is checked in seconds; ``make gpu-check-dry`` runs the real CPU parts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_check.sh"
ORDER = [
    "dali",
    "data",
    "toolchain",
    "bench resnet50 eager",
    "bench resnet50 compiled",
    "tests",
    "bench resnet18 eager",
    "bench resnet18 compiled",
]


def run_check(tmp_path: Path, budget: int, simulate: str, **env: str) -> tuple[int, str, str, float]:
    """The script's exit status, its output, its summary.txt and its wall time."""
    out = tmp_path / "out"
    full = {
        **os.environ,
        "GPU_CHECK_DRY": "1",
        "PYTHON": sys.executable,
        "GPU_CHECK_BUDGET_S": str(budget),
        "GPU_CHECK_SIMULATE": simulate,
        "OUT": str(out),
        **env,
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=budget + 60
    )
    return (
        proc.returncode,
        proc.stdout + proc.stderr,
        (out / "summary.txt").read_text(),
        time.monotonic() - t0,
    )


def started(output: str) -> list[str]:
    """Each item's first line, in the order the script reached them: the item's name."""
    names = []
    for line in output.splitlines():
        m = re.match(r"== (.+?)(?: \(simulated\))?(?: \(limit |: )", line)
        if m and m.group(1) not in names and not m.group(1).startswith("GPU check"):
            names.append(m.group(1))
    return names


def test_a_slow_group_is_stopped_and_the_rest_cut_within_the_budget(tmp_path):
    budget = 25
    # Every item takes no time except ResNet-50 compiled, which would take 100 s.
    rc, output, summary, wall = run_check(tmp_path, budget, "*=0,resnet50:compiled=100")
    assert rc == 0, output
    assert started(output) == ORDER
    assert "== bench resnet50 eager (simulated): ok" in output
    assert re.search(r"== bench resnet50 compiled \(simulated\): TIMED OUT at \d+s", output)
    for name in ("tests", "bench resnet18 eager", "bench resnet18 compiled"):
        assert re.search(rf"== {name}: CUT, \d+s of the budget left, it needs >= 5s", output), name
    last = summary.strip().splitlines()
    assert last[-2] == (
        "Not in this run: stopped at its time limit: resnet50 compiled (a bench's rows it did not reach "
        f"say so above); cut by the {budget}s budget, never started: tests, resnet18 eager, resnet18 compiled;"
    )
    assert last[-1] == (
        "run them alone with: GPU_CHECK_PLAN='resnet50:compiled:synthetic+gpu_cache+dali+torch tests "
        "resnet18:eager:synthetic+gpu_cache+dali resnet18:compiled:synthetic+gpu_cache+dali' bash tests/gpu_check.sh"
    )
    # The budget holds: the slow item is stopped at what was left of it, the table fits the reserve.
    assert wall < budget + 5


def test_without_a_compiler_the_compiled_groups_say_so_and_the_torch_row_runs_eager(tmp_path):
    rc, output, summary, _ = run_check(tmp_path, 60, "*=0", CC="/nonexistent/cc")
    assert rc == 0, output
    assert "step toolchain: MISSING: /nonexistent/cc cannot compile against" in summary
    for arch in ("resnet50", "resnet18"):
        assert (
            f"step bench {arch} compiled: not run: torch.compile needs /nonexistent/cc cannot compile"
            in summary
        )
    # The torch row, planned once in ResNet-50 compiled, is measured eager instead; nothing is cut.
    (line,) = [x for x in output.splitlines() if "--backend torch" in x]
    assert "bench resnet50 eager" in line and "train.compile=false" in line and "--backend dali" not in line
    assert "Not in this run" not in summary
