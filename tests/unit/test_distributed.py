import pytest

from invasive_dist import distributed
from invasive_dist.distributed import WorldInfo, check_precision, world_info_from_env
from invasive_dist.errors import UserError


def test_plain_python():
    w = world_info_from_env({})
    assert (w.rank, w.world_size, w.launcher, w.is_main) == (0, 1, "python", True)


def test_torchrun_env():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "TORCHELASTIC_RUN_ID": "x",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }
    w = world_info_from_env(env)
    assert (w.rank, w.local_rank, w.world_size, w.node_rank, w.local_world_size) == (3, 1, 4, 1, 2)
    assert w.launcher == "torchrun" and w.restart_count == 2 and not w.is_main


def test_slurm_with_torchrun():
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "TORCHELASTIC_RUN_ID": "7",
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": "1",
    }
    w = world_info_from_env(env)
    assert w.launcher == "slurm" and w.slurm_job_id == "42" and w.slurm_restart_count == 1


def test_bad_env_is_user_error():
    with pytest.raises(UserError, match="RANK='x'"):
        world_info_from_env({"RANK": "x"})
    with pytest.raises(UserError, match="outside WORLD_SIZE"):
        world_info_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="torchrun"):
        world_info_from_env({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})


def test_fp16_on_cpu_fails_before_work():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", use_cuda=False)
    check_precision("bf16", use_cuda=False)


def _machine(monkeypatch, tmp_path, cores: int, affinity: int, cgroup: dict[str, str]) -> None:
    """A machine of ``cores`` cores, this process bound to ``affinity`` of them, and a cgroup folder
    holding ``cgroup`` (relative path -> text)."""
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    root = tmp_path / f"cgroup{len(list(tmp_path.iterdir()))}"  # a fresh folder per machine
    root.mkdir()
    for rel, text in cgroup.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setattr(distributed, "CGROUP_ROOT", root)


@pytest.mark.parametrize(
    "cgroup, quota",
    [
        ({}, None),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "400000 100000\n"}, 4.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "1600000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16.0),
        ({"cpu.max": "garbage"}, None),
    ],
    ids=["none", "v2-max", "v2-4", "v2-1.5", "v1-none", "v1-16", "unreadable"],
)
def test_cpu_quota_of_cgroup_v1_and_v2(monkeypatch, tmp_path, cgroup, quota):
    _machine(monkeypatch, tmp_path, 64, 64, cgroup)
    assert distributed.cpu_quota() == quota


def test_cores_follow_affinity_and_quota(monkeypatch, tmp_path):
    eight = WorldInfo(world_size=8, local_world_size=8)
    _machine(monkeypatch, tmp_path, 64, 64, {})
    assert (distributed.usable_cores(), distributed.cores_per_process(eight)) == (64, 8)
    # Docker --cpus=16 on the 64-core host: the container's 16 shared by its 8 ranks.
    _machine(monkeypatch, tmp_path, 64, 64, {"cpu.max": "1600000 100000"})
    assert (distributed.usable_cores(), distributed.cores_per_process(eight)) == (16, 2)
    # --cpus=1.5 rounds up to 2 cores; never less than 1 per process.
    _machine(monkeypatch, tmp_path, 64, 64, {"cpu.max": "150000 100000"})
    assert (distributed.usable_cores(), distributed.cores_per_process(eight)) == (2, 1)
    # Slurm --cpus-per-task=6 binds each rank: its 6 are its share, whatever the node's rank count.
    _machine(monkeypatch, tmp_path, 64, 6, {})
    assert (distributed.usable_cores(), distributed.cores_per_process(eight)) == (6, 6)


# ------------------------------------------------------------------------------------------------
# A lost peer, in words (the gloo messages as torch 2.14 raises them).
RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.213.0.2]:64659: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
    "application. Check the logs of the remote worker before reporting an error. GLHF!"
)
TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
    "20000ms for recv operation to complete"
)


@pytest.fixture
def two_hosts(monkeypatch):
    from invasive_dist import distributed

    table = [("node1", "10.213.0.1")] * 2 + [("node2", "10.213.0.2")] * 2
    monkeypatch.setattr(distributed, "HOSTS", table)
    return distributed


def test_a_closed_connection_names_the_lost_host_and_its_ranks(two_hosts):
    e = RuntimeError(RESET)
    assert two_hosts.is_peer_failure(e)
    msg = two_hosts.peer_failure_message(
        e, 0, 7, "The last intact checkpoint is X (step 6).", "CMD resume=auto"
    )
    assert msg.startswith("rank 0 on node1: lost ranks 2, 3 on node2 (10.213.0.2)")
    assert "at step 7 (Read error [10.213.0.2]:64659: Connection reset by peer.)" in msg
    assert msg.endswith(
        "The last intact checkpoint is X (step 6). To continue, on the same or fewer nodes: CMD resume=auto"
    )
    assert "GLHF" not in msg and "pair.cc" not in msg


def test_a_timeout_names_the_ranks_on_the_other_hosts(two_hosts):
    e = RuntimeError(TIMEOUT)
    assert two_hosts.is_peer_failure(e)
    msg = two_hosts.peer_failure_message(e, 2, None, "", "CMD")
    assert "rank 2 on node2: the other ranks stopped answering (on other hosts: ranks 0, 1 on node1;" in msg
    assert "Timed out waiting 20000ms" in msg


def test_a_pair_closed_by_the_timeout_is_a_silent_peer(two_hosts):
    """What the second rank of a cut-off node raised in backward (DDP's all-reduce): one line, no
    "gloo" in it; it printed a traceback before it was recognised."""
    e = RuntimeError("Application timeout caused pair closure")
    assert two_hosts.is_peer_failure(e)
    assert "the other ranks stopped answering" in two_hosts.peer_failure_message(e, 3, 3, "", "CMD")


def test_a_rank_of_this_host_closing_first_still_names_the_other_host(two_hosts):
    """CI, node2's link cut: rank 0 on node1 saw its own node's rank 1 (which had timed out on
    node2) close first, and blamed node1 itself ("lost the rank at node1"). The cause is elsewhere."""
    e = RuntimeError(
        RESET.replace(
            "Read error [10.213.0.2]:64659: Connection reset", "Connection closed by peer [10.213.0.1]:43926"
        )
    )
    assert two_hosts.is_peer_failure(e)
    msg = two_hosts.peer_failure_message(e, 0, 3, "", "CMD")
    assert msg.startswith("rank 0 on node1: rank 1 on this host ended first, most likely after losing")
    assert "ranks 2, 3 on node2" in msg and "at step 3" in msg
    assert "lost the rank at node1" not in msg


def test_other_runtime_errors_are_bugs_not_lost_peers(two_hosts):
    assert not two_hosts.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not two_hosts.is_peer_failure(ValueError("timed out reset by peer gloo"))


def test_a_restarted_worker_reports_afresh_and_the_agent_reads_its_attempt(monkeypatch, tmp_path):
    """torchrun --max-restarts: the first attempt's claim to report and exit code (a lost peer,
    1) must not silence the next attempt's message, nor pass for its exit code at the launcher."""
    import importlib.util

    from ..conftest import ROOT

    spec = importlib.util.spec_from_file_location("agent", ROOT / "launch" / "agent.py")
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    monkeypatch.setenv(distributed.STATUS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert distributed.claim_report("peer-failure") and not distributed.claim_report("peer-failure")
    distributed.record_exit(1)
    assert agent.worker_codes(tmp_path) == {0: 1}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.claim_report("peer-failure")  # attempt 1 reports its own lost peer
    distributed.record_exit(2)
    monkeypatch.setenv("RANK", "1")
    distributed.record_exit(143)
    assert agent.worker_codes(tmp_path) == {0: 2, 1: 143}
