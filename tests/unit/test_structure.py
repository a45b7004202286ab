"""The package's shape: every module imports on its own, the import graph has no cycle, and the
global batch is split once, by one rule (``build.resolve_batch``), with errors that say what works."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from invasive_dist.build import resolve_batch
from invasive_dist.config import load_config
from invasive_dist.errors import UserError

from ..conftest import ROOT

PACKAGE = ROOT / "invasive_dist"
# Children importing at once in the fresh-import check (FRESH_IMPORTS): the CI machine has 2 cores.
# Measured here (2 cores shared with other jobs, load 3): 34 modules in 12 s, 39 s when only torch was
# imported before the forks; one interpreter per module (4.6 s each for `import torch` alone at that
# load) would take about 34 x 6 s / 2 = 100 s.
IMPORT_POOL = 2


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or in functions),
    with ``from X import Y`` (absolute or relative) and ``import X``."""
    root = package.parent
    files = {_module_name(p, root): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [target, *(f"{target}.{a.name}" for a in node.names)]
            else:
                continue
            for cand in cands:
                if cand in files and cand != mod:
                    graph[mod].add(cand)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(mod: str, path: list[str]) -> list[str] | None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [mod, dep] if dep in path else [mod, dep]
            if dep not in state:
                found = visit(dep, [*path, mod])
                if found:
                    return found
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state:
            found = visit(mod, [])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))
    assert "invasive_dist.train" not in graph["invasive_dist.predict"]  # predict needs no Trainer
    assert len(graph) > 20  # the walk saw the package


def test_the_cycle_check_sees_imports_inside_functions_and_every_import_form(tmp_path):
    """The check can fail: a cycle closed by an import inside a function, through each form."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    (pkg / "d.py").write_text("from pkg import c\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg", "pkg.a"} and graph["pkg.d"] == {"pkg", "pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


# Run in a child Python: torch and torchvision imported once (1.1 s + 1.3 s of CPU, nearly every
# module imports them), then one forked child per module imports that module alone, IMPORT_POOL at a
# time. Each child starts as a fresh interpreter would after `import torch, torchvision`: no module
# of the package loaded, so no earlier import of the package can hide a failure.
FRESH_IMPORTS = """
import importlib, os, sys, traceback
import torch, torchvision  # noqa: F401, E401
mods, pool = sys.argv[2:], int(sys.argv[1])
running, failed = {}, []

def reap():
    pid, status = os.wait()
    mod = running.pop(pid)
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(mod)

for mod in mods:
    if len(running) >= pool:
        reap()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(mod)
            code = 0
        except BaseException:
            os.write(2, f"--- import {mod} failed:\\n{traceback.format_exc()}".encode())
            code = 1
        os._exit(code)
    running[pid] = mod
while running:
    reap()
print("failed:", *sorted(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module in its own fresh interpreter (see FRESH_IMPORTS): a module that imports only
    because an earlier import loaded what it needs fails here."""
    skip = (".__main__",)  # runs the CLI
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        skip += (".dali",)  # the DALI backend needs nvidia.dali (optional)
    mods = [m for m in sorted(import_graph()) if not m.endswith(skip)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", FRESH_IMPORTS, str(IMPORT_POOL), *mods],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and p.stdout.strip() == "failed:", p.stdout + p.stderr[-6000:]
    assert len(mods) > 20


def plan(world: int, resumed: int | None = None, *overrides: str):
    return resolve_batch(load_config(None, list(overrides)), world, resumed)


def test_auto_accumulation_keeps_the_global_batch_within_the_device_bound():
    # 64 = 32 x 2 x 1 = 32 x 1 x 2 = 16 x 4 x 1; per device never above data.batch_size=32.
    for world, per, accum in [(2, 32, 1), (1, 32, 2), (4, 16, 1), (8, 8, 1)]:
        p = plan(world, None, "data.global_batch_size=64", "train.grad_accum=auto")
        assert (p.per_device, p.world, p.accum, p.global_batch) == (per, world, accum, 64)
    p = plan(1, 64, "train.grad_accum=auto")  # resumed: the checkpoint's global batch
    assert (p.per_device, p.accum, p.global_batch) == (32, 2, 64)
    p = plan(1, 48, "train.grad_accum=auto", "data.batch_size=20")  # 48 = 16 x 3 (24 > 20)
    assert (p.per_device, p.accum) == (16, 3)


def test_a_fresh_run_without_a_global_batch_multiplies_out():
    p = plan(3, None, "data.batch_size=5", "train.grad_accum=2")
    assert (p.per_device, p.world, p.accum, p.global_batch) == (5, 3, 2, 30)


@pytest.mark.parametrize(
    "world,resumed,overrides,message",
    [
        (3, 64, ["train.grad_accum=auto"], "process counts that work: 1, 2, 4, 8, 16, 32, 64"),
        (3, None, ["data.global_batch_size=64"], "process counts that work: 1, 2, 4, 8, 16, 32, 64"),
        (2, None, ["data.global_batch_size=12", "train.grad_accum=4"], "process counts that work: 1, 3"),
        (1, 64, [], "train.grad_accum=auto"),  # a fixed per-device batch cannot keep 64 on 1 process
        (2, 64, ["data.global_batch_size=32"], "keep the checkpoint's global batch"),
    ],
)
def test_no_exact_split_is_a_user_error_saying_what_works(world, resumed, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        plan(world, resumed, *overrides)


def test_grad_accum_takes_auto_or_a_positive_integer():
    assert load_config(None, ["train.grad_accum=auto"]).train.grad_accum == "auto"
    assert load_config(None, ["train.grad_accum=3"]).train.grad_accum == 3
    with pytest.raises(UserError, match="grad_accum"):
        load_config(None, ["train.grad_accum=sometimes"])


@pytest.mark.parametrize("n", [100, 96])
def test_an_optimizer_step_trains_on_the_same_samples_however_the_global_batch_is_split(n):
    """Elastic resume rests on this: G=32 as 1 x 32 x 1, 2 x 16 x 1, 2 x 8 x 2, 4 x 4 x 2, 1 x 8 x 4
    (processes x batch x accum) gives ceil(n / 32) optimizer steps of the same samples each."""
    from invasive_dist.data.base import Shard, train_plan, train_steps

    def steps_of(world: int, batch: int, accum: int) -> list[list[int]]:
        plans = [train_plan(n, batch, Shard(r, world, accum), seed=3, epoch=1) for r in range(world)]
        assert {train_steps(n, batch, Shard(r, world, accum)) for r in range(world)} == {len(plans[0])}
        micro = [np.concatenate([p[s] for p in plans]) for s in range(len(plans[0]))]
        return [sorted(np.concatenate(micro[k : k + accum]).tolist()) for k in range(0, len(micro), accum)]

    reference = steps_of(1, 32, 1)
    assert len(reference) == -(-n // 32)
    assert set(np.concatenate(reference).tolist()) == set(range(n))  # every sample at least once
    for world, batch, accum in [(2, 16, 1), (2, 8, 2), (4, 4, 2), (1, 8, 4)]:
        assert steps_of(world, batch, accum) == reference, (world, batch, accum)
