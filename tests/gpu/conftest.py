"""Fixtures of the GPU tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from accelerate.state import AcceleratorState


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one precision per process; the GPU tests use bf16, the CPU tests "no"."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def measured(request) -> Callable[[str, float, str, bool], str]:
    """``measured(what, value, bound, ok)`` -> the line "test: what = value (bound ...)", printed and
    appended to $INVASIVE_DIST_GPU_MEASURED (tests/gpu_check.sh's measured.txt) whether it passes or
    not. For tolerances nobody has measured on a GPU yet: a failure then shows by how much, and a pass
    shows the margin, without a rerun. Assert ``ok`` with the line as the message."""

    def report(what: str, value: float, bound: str, ok: bool) -> str:
        line = f"{request.node.name}: {what} = {value:.4g} (bound {bound}){'' if ok else ' EXCEEDED'}"
        print(line)
        path = os.environ.get("INVASIVE_DIST_GPU_MEASURED")
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
        return line

    return report
