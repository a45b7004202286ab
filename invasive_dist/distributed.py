"""The only module that reads the launcher's and Slurm's environment, and that builds the Accelerator.

    world = world_info_from_env()
    accelerator = build_accelerator(cfg, world)
    accelerator, world = accelerator_from_env(cfg)   # the two in one call (what commands use)
    threads = cores_per_process()                    # this process's share of the node's CPU cores
    if is_peer_failure(err):                         # a host lost: who, where, how to continue
        print(peer_failure_message(err, rank, step, checkpoint_line, command))

Launchers: plain ``python`` (one process), ``torchrun`` (single- or multi-node, c10d rendezvous),
``accelerate launch`` (which sets the same RANK/WORLD_SIZE/LOCAL_RANK variables), and Slurm
(``slurm/train.sbatch`` runs one torchrun agent per node through ``srun``). The process-group
backend is NCCL on GPUs and gloo on CPU unless ``dist.backend`` says otherwise.

**A lost peer.** When a host dies, freezes or drops off the network, a collective fails on the
survivors: gloo reports "Connection reset/closed by peer [ADDR]" at once when the peer's kernel
closed its sockets (the host's processes were killed), or "Timed out waiting ...ms" after
``dist.timeout_s`` when nothing answers (a frozen host, a cut link). :func:`build_accelerator`
records which host each rank runs on (one all-gather at start), so that
:func:`peer_failure_message` can name the lost host and its ranks, the step, the last intact
checkpoint and the command that continues; ``cli.main`` prints it instead of a traceback.

**Exit status for the launcher.** Under ``launch/train.sh`` (``launch/agent.py``) each process
records its exit status in ``$INVASIVE_DIST_STATUS_DIR/restart-K`` (:func:`record_exit`; K:
torchrun's restart count) when it ends with a message of its own; the launcher then passes that
code on (2 for a user error) without torchrun's banner, and :func:`claim_report` lets one process
per node (and attempt) print a message that every rank hits.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast_object_list

from .errors import UserError


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "python"  # python | torchrun | accelerate | slurm
    restart_count: int = 0  # torchrun restarts of this worker group
    slurm_job_id: str = ""
    slurm_restart_count: int = 0  # times Slurm requeued this job

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {key}={value!r} is not an integer") from None


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    env = os.environ if env is None else env
    if "ACCELERATE_DYNAMO_BACKEND" in env or "ACCELERATE_MIXED_PRECISION" in env:
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        launcher = "torchrun"
    else:
        launcher = "python"
    if "SLURM_JOB_ID" in env and launcher != "python":
        launcher = "slurm"
    world = WorldInfo(
        rank=_int(env, "RANK", 0),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=_int(env, "WORLD_SIZE", 1),
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
        node_rank=_int(env, "GROUP_RANK", _int(env, "SLURM_NODEID", 0)),
        launcher=launcher,
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        slurm_job_id=env.get("SLURM_JOB_ID", ""),
        slurm_restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
    )
    if not 0 <= world.rank < world.world_size:
        raise UserError(f"RANK={world.rank} is outside WORLD_SIZE={world.world_size}; check the launcher")
    if world.world_size == 1 and _int(env, "SLURM_NTASKS", 1) > 1 and launcher == "python":
        raise UserError(
            f"SLURM_NTASKS={env['SLURM_NTASKS']} but no torchrun: start one torchrun agent per node "
            "(see slurm/train.sbatch) instead of one python per task"
        )
    return world


# Where the kernel shows this process's cgroup (v2: cpu.max; v1: cpu/cpu.cfs_quota_us and _period_us).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota() -> float | None:
    """The CPUs a cgroup quota grants (Docker ``--cpus``, Kubernetes CPU limits), None without one.
    A quota leaves the affinity set whole (a 64-core host with ``--cpus=4`` still shows 64 cores)
    while the kernel throttles beyond 4 cores' worth of time: threads sized by the affinity alone
    would wait most of the time."""
    try:
        v2 = CGROUP_ROOT / "cpu.max"  # "max 100000" (none) or "400000 100000" (4 CPUs)
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        v1 = CGROUP_ROOT / "cpu"
        quota = int((v1 / "cpu.cfs_quota_us").read_text())  # -1: none
        return quota / int((v1 / "cpu.cfs_period_us").read_text()) if quota > 0 else None
    except (OSError, ValueError):
        return None


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # no affinity on this platform (macOS)


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity set, which Slurm (--cpus-per-task), numactl
    and taskset narrow, unlike ``os.cpu_count()`` (the whole machine's), and no more than a cgroup
    CPU quota grants (rounded up)."""
    quota = cpu_quota()
    return max(1, min(_affinity(), math.ceil(quota) if quota else _affinity()))


def cores_per_process(world: WorldInfo | None = None) -> int:
    """This process's share of the node's cores for its input pipelines: ``usable_cores()``, divided
    among the node's processes (``world``, default this process's launch) unless the launcher already
    bound each process to a subset of the cores (Slurm --cpus-per-task, numactl). A cgroup quota is
    the whole container's, so it is divided too: 8 ranks under ``--cpus=16`` get 2 each."""
    if _affinity() < (os.cpu_count() or 1):
        return usable_cores()  # already bound: this is our share
    world = world_info_from_env() if world is None else world
    return max(1, usable_cores() // max(1, world.local_world_size))


def _backend(cfg, use_cuda: bool) -> str:
    if cfg.dist.backend != "auto":
        if cfg.dist.backend == "nccl" and not use_cuda:
            raise UserError("dist.backend=nccl needs CUDA GPUs; use dist.backend=auto or gloo on CPU")
        return cfg.dist.backend
    return "nccl" if use_cuda else "gloo"


def check_precision(mixed_precision: str, use_cuda: bool) -> None:
    """Precision settings the device cannot run fail here, before any work."""
    if mixed_precision == "fp16" and not use_cuda:
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if mixed_precision == "bf16" and use_cuda and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise UserError(f"train.mixed_precision=bf16: {name} has no bf16 support; use fp16")


def build_accelerator(cfg, world: WorldInfo) -> Accelerator:
    """Accelerator with the backend, collective timeout and precision of ``cfg``."""
    use_cuda = torch.cuda.is_available()
    check_precision(cfg.train.mixed_precision, use_cuda)
    # ResNets use every parameter each step; searching for unused ones costs a graph walk.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True)]
    if world.world_size > 1:  # a backend given to a single process would make Accelerate init one
        timeout = timedelta(seconds=cfg.dist.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=_backend(cfg, use_cuda), timeout=timeout))
    accelerator = Accelerator(
        cpu=not use_cuda,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    record_hosts()
    return accelerator


def accelerator_from_env(cfg) -> tuple[Accelerator, WorldInfo]:
    """The world this process was launched into, and the Accelerator built for it (each command's start)."""
    world = world_info_from_env()
    return build_accelerator(cfg, world), world


def decided_by_main(accelerator, decide: Callable[[], object]):
    """``decide()`` run on the main process only, its (picklable) result returned on every rank.

    For choices taken from files (is this fold finished? are these pseudo-labels current?): on a
    shared filesystem such as NFS one node can see a file another does not yet, and ranks that
    branch differently wait in each other's collectives until the timeout. A UserError raised by
    ``decide`` is raised on every rank. Collective when there are several processes."""
    if accelerator is None or accelerator.num_processes <= 1:
        return decide()
    box: list = [None]
    if accelerator.is_main_process:
        try:
            box = [(True, decide())]
        except UserError as e:
            box = [(False, e)]
    broadcast_object_list(box, from_process=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


# ------------------------------------------------------------------------------------------------
# Who runs where, and what to say when a peer is lost.

# rank -> (hostname, address), filled by record_hosts() at start; empty in a single process.
HOSTS: list[tuple[str, str]] = []
STATUS_ENV = "INVASIVE_DIST_STATUS_DIR"  # set by launch/agent.py; node-local
EXIT_PEER_LOST = 1  # a collective failed because another rank is gone or silent
_ADDR = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]+)\]:\d+")
_PEER_WORDS = ("closed by peer", "reset by peer", "timed out", "connection refused", "broken pipe")


def _my_address() -> tuple[str, str]:
    name = socket.gethostname()
    try:
        return name, socket.gethostbyname(name)  # the address gloo binds by default
    except OSError:
        return name, ""


def record_hosts() -> None:
    """Every rank's (hostname, address) into :data:`HOSTS` (collective; a no-op in one process)."""
    HOSTS.clear()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, _my_address())
    HOSTS.extend(tuple(t) for t in table)


def rank_host(rank: int) -> str:
    """``rank 3 (node2)``: a rank and the host it runs on, as :func:`record_hosts` found it."""
    return f"rank {rank} ({HOSTS[rank][0]})" if rank < len(HOSTS) else f"rank {rank}"


def is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because another rank is gone or silent (gloo or NCCL)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    if "application timeout caused pair closure" in text:  # gloo, the second rank of a node whose
        return True  # peer timed out: no "gloo" in it (seen from DDP's all-reduce in backward)
    return ("gloo" in text or "nccl" in text) and any(w in text for w in _PEER_WORDS)


def _ranks_text(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}"


def lost_peer(error: BaseException, rank: int) -> str:
    """Which host and ranks ``error`` points at, in words: the peer address gloo names when the
    peer's sockets were closed, else (a timeout) the ranks that run on other hosts."""
    me = HOSTS[rank][0] if rank < len(HOSTS) else socket.gethostname()
    others: dict[str, list[int]] = {}
    for r, (host, _) in enumerate(HOSTS):
        if host != me:
            others.setdefault(host, []).append(r)
    where = "; ".join(f"{_ranks_text(rs)} on {h}" for h, rs in others.items())
    m = _ADDR.search(str(error))
    if m and HOSTS:
        addr = m.group(1)
        ranks = [r for r, (_, a) in enumerate(HOSTS) if a == addr]
        if ranks and HOSTS[ranks[0]][0] != me:
            host = HOSTS[ranks[0]][0]
            return f"lost {_ranks_text(ranks)} on {host} ({addr}): its connections were closed (the host or its processes died)"
        if ranks:  # a rank of this host closed first: most often it had itself lost another host
            mine = [r for r in ranks if r != rank]
            return f"{_ranks_text(mine or ranks)} on this host ended first" + (
                f", most likely after losing the other hosts' ranks ({where}; a host down, frozen or cut off the network)"
                if where
                else ""
            )
        with contextlib.suppress(OSError):
            return f"lost the rank at {socket.gethostbyaddr(addr)[0]} ({addr})"
        return f"lost the rank at {addr}"
    return "the other ranks stopped answering" + (
        f" (on other hosts: {where}; a host down, frozen or cut off the network)" if where else ""
    )


def peer_failure_message(
    error: BaseException, rank: int, step: int | None, checkpoint: str, command: str
) -> str:
    """One paragraph for the survivors of a lost peer: who, where, what is safe, how to continue."""
    me = HOSTS[rank][0] if rank < len(HOSTS) else socket.gethostname()
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*(gloo|nccl)[^\]]*\]\s*", "", first, flags=re.IGNORECASE)
    first = first.split(" This is typically caused", 1)[0][:300]  # gloo's generic advice
    at = f" at step {step}" if step is not None else ""
    return (
        f"rank {rank} on {me}: {lost_peer(error, rank)}{at} ({first}). {checkpoint} "
        f"To continue, on the same or fewer nodes: {command}"
    )


def _status_dir() -> Path | None:
    """This attempt's folder in the launcher's status folder: ``restart-K`` (K: torchrun's restart
    count), so that a restarted worker (``--max-restarts``) neither reads an earlier attempt's
    claim to report nor leaves its exit code to be taken for this attempt's."""
    d = os.environ.get(STATUS_ENV, "")
    if not (d and Path(d).is_dir()):
        return None
    attempt = Path(d) / f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT') or 0}"
    try:
        attempt.mkdir(exist_ok=True)
    except OSError:
        return None
    return attempt


def claim_report(kind: str) -> bool:
    """True for the first process of this node that asks (one message per node for an error every
    rank hits); True everywhere without the launcher's status folder."""
    d = _status_dir()
    if d is None:
        return True
    try:
        os.close(os.open(d / f"reported-{kind}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True


def record_exit(code: int) -> None:
    """Tell the launcher (launch/agent.py) this process ends with ``code`` after its own message."""
    d = _status_dir()
    if d is None:
        return
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError):
        (d / f"rank-{rank}").write_text(f"{code}\n")
