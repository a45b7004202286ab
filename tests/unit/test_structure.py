"""The package's shape: every module imports on its own, the import graph has no cycle, and the
global batch is split once, by one rule (``build.resolve_batch``), with errors that say what works."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from invasive_dist.build import resolve_batch
from invasive_dist.config import load_config
from invasive_dist.errors import UserError

from ..conftest import ROOT

PACKAGE = ROOT / "invasive_dist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or in functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for cand in [target, *(f"{target}.{a.name}" for a in node.names)]:
                if cand in files and cand != mod:
                    graph[mod].add(cand)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep) :] + [mod, dep]))
            if dep not in state:
                visit(dep, [*path, mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert "invasive_dist.train" not in graph["invasive_dist.predict"]  # predict needs no Trainer
    assert len(graph) > 20  # the walk saw the package


def test_every_module_imports_on_its_own():
    for mod in sorted(import_graph()):
        if mod.endswith((".dali", ".__main__")):
            continue  # dali needs nvidia.dali (optional); __main__ runs the CLI
        importlib.import_module(mod)


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
