"""Two real hosts (network namespaces, see hosts.py) running the documented multi-node launch:

    launch/train.sh --nnodes 2 --node-rank R --master node1:29500 -n 2 CONFIG key=value ...

on each host, with faults injected from outside as on a real cluster (never by a variable the code
reads): every process of a host killed, a host frozen, its link cut for good or for 3 s, a slow host.

- Two hosts x 2 processes end with the weights of one host x 4 processes (same global batch, the
  settings and the tolerance of tests/integration/test_distributed.py: one image per forward, so
  BatchNorm does the same arithmetic whatever the split; 1e-5 of the distance the weights moved).

Run: ``python -m pytest tests/cluster -q`` as root (skipped otherwise).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from invasive_dist.metrics import read_metrics

from ..conftest import ROOT
from ..integration.test_distributed import EXACT, N_TRAIN, N_VAL, flat, last_state, learnable
from ..procs import clean_env, kill_tree, write_init_weights
from .hosts import Host

TRAIN_SH = ROOT / "launch" / "train.sh"
PORT = 29500  # each host is its own network namespace: the port is free on every one
RUN_TIMEOUT = 420  # s per launch; generous: the machine running the tests may be shared


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hosts")


@pytest.fixture(scope="module")
def square_data(work) -> Path:
    """48 labelled 64x64 images (36 train / 12 validation), as in test_distributed.py."""
    from invasive_dist.data.synth import synthesize

    out = work / "data"
    synthesize(out, n_train=N_TRAIN + N_VAL, n_test=8, size=(64, 64), seed=0)
    return out


@pytest.fixture(scope="module")
def config(work) -> Path:
    path = work / "empty.yaml"
    path.write_text("{}\n")
    return path


def wait(p: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        p.wait()
        pytest.fail(f"still running after {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


def start_node(
    host: Host, rank: int, config: Path, overrides: list[str], log: Path, job: str, nproc: int = 2
):
    """The documented launch, run on ``host`` as node-rank ``rank`` of 2 (``job``: the rendezvous id)."""
    cmd = [TRAIN_SH, "--nnodes", "2", "--node-rank", rank, "--master", f"node1:{PORT}", "-n", nproc, config]
    env = clean_env(extra={"RDZV_ID": job})
    return host.start([*cmd, *overrides], log, env, cwd=ROOT)


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_four_processes(cluster, work, square_data, config):
    init_path, init = write_init_weights(work / "init.pt")
    common = [
        *EXACT,
        "train.epochs=1",
        f"data.root={square_data}",
        f"output.root={work}",
        f"model.weights={init_path}",
    ]
    ref_log = work / "one-host.log"
    # The reference: 4 processes on one host.
    p = cluster.hosts[0].start(
        [TRAIN_SH, "-n", 4, config, *common, "output.name=one-host"], ref_log, clean_env(), ROOT
    )
    assert wait(p, ref_log) == 0, ref_log.read_text()[-4000:]

    logs = [work / f"two-hosts-node{r}.log" for r in (0, 1)]
    procs = [
        start_node(h, r, config, [*common, "output.name=two-hosts"], logs[r], "two-hosts")
        for r, h in enumerate(cluster.hosts)
    ]
    rcs = [wait(p, log) for p, log in zip(procs, logs)]
    out = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
    assert rcs == [0, 0], f"exit codes {rcs}\n{out}"
    assert "global batch 4 = 1 per device x 4 processes x 1 accumulation" in out, out

    a, b = last_state(work / "two-hosts"), last_state(work / "one-host")
    steps = N_TRAIN // 4
    assert a["global_step"] == b["global_step"] == steps and a["global_batch"] == b["global_batch"] == 4
    wa, wb, w0 = flat(learnable(a["model"])), flat(learnable(b["model"])), flat(learnable(init))
    moved, gap = float((wb - w0).norm()), float((wa - wb).norm())
    assert moved > 0.1, f"the reference barely trained (moved {moved:.3g})"
    assert gap <= 1e-5 * moved, (
        f"2 hosts x 2 vs 1 host x 4: {gap:.3g} apart, {gap / moved:.2e} of the distance moved"
    )
    val = [r for r in read_metrics(work / "two-hosts") if "val/n" in r]
    assert [r["val/n"] for r in val] == [N_VAL]
