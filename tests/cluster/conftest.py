"""The ``cluster`` fixture: two hosts made of network namespaces (see hosts.py), removed afterwards
whatever the test did; skipped where the machine cannot make them (not root, no cgroup v1)."""

from __future__ import annotations

import pytest

from .hosts import Cluster, available, sweep


@pytest.fixture(scope="session")
def can_make_hosts() -> None:
    why = available()
    if why:
        pytest.skip(why)
    sweep()  # what an earlier, killed test process left behind


@pytest.fixture
def cluster(can_make_hosts, tmp_path):
    c = Cluster(2, tmp_path / "scratch")
    try:
        yield c
    finally:
        c.close()
