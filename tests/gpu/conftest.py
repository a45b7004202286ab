"""Fixtures of the GPU tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


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
