"""Fixtures of the GPU tests."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one precision per process; the GPU tests use bf16, the CPU tests "no"."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
