"""torchrun, as launch/train.sh and launch/predict.sh run it: torch's own ``torchrun`` main, in this
process, with three things added. Not meant to be run by hand (the scripts print the plain torchrun
command it runs).

    python launch/agent.py TORCHRUN_ARGS...      # = torchrun TORCHRUN_ARGS...

1. **Errors our workers already explained end quietly, with their exit code.** A worker that printed
   its own one-line message (a user error: exit 2; a lost peer or a wait past ``dist.timeout_s``:
   exit 1; a stop signal: 143) records that in ``$INVASIVE_DIST_STATUS_DIR/restart-K`` (a folder
   made here, node-local; K counts torchrun's restarts of the workers, ``--max-restarts``). When
   the first worker that failed on this node in the last attempt did (torchrun then ends the
   others with SIGTERM), torchrun's ``ChildFailedError`` banner (about 40 lines that only repeat
   "exitcode 2") is not printed, and this node's launcher exits with that worker's code instead of
   torchrun's 1. A worker that died without a word (a bug's traceback, SIGKILL, the OOM killer)
   still gets torchrun's banner.
2. **A lost rendezvous store ends the agent with one line** (exit 1) instead of torchrun's
   ``RendezvousConnectionError`` traceback: with ``--max-restarts``, the restart needs the store
   that node-rank 0's agent hosts, and nothing can re-form the job once that host is gone.
3. **The agent does not outlive its workers for long.** Once every worker of this node has ended,
   torchrun still talks to the rendezvous store on node-rank 0 (exit barrier, rendezvous shutdown).
   If that host is gone or unreachable, those calls wait for torchrun's own timeouts (measured:
   more than 11 minutes). ``AGENT_GRACE_S`` seconds after the last worker ended, this thread ends
   the agent with the workers' exit code and a line that says why. Without ``--max-restarts``
   only: with restarts, an agent without workers may be waiting for the next rendezvous round
   (``--nnodes MIN:MAX``: the nodes still up re-form the job, see launch/README.md), which
   torchrun's rendezvous timeouts bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

AGENT_GRACE_S = float(os.environ.get("INVASIVE_DIST_AGENT_GRACE_S", "20"))
STATUS_ENV = "INVASIVE_DIST_STATUS_DIR"


def _children(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid`` (Linux /proc; [] elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def worker_codes(status_dir: Path) -> dict[int, int]:
    """Rank -> exit code of the latest attempt's workers that reported one (``restart-K/rank-N``
    files, see cli.main; K counts torchrun's restarts, an earlier attempt's codes are not this one's)."""
    attempts = [d for d in status_dir.glob("restart-*") if d.name[8:].isdigit()]
    if not attempts:
        return {}
    codes = {}
    for f in max(attempts, key=lambda d: int(d.name[8:])).glob("rank-*"):
        try:
            codes[int(f.name[5:])] = int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return codes


def node_exit_code(codes: dict[int, int]) -> int:
    bad = [c for c in codes.values() if c != 0]
    return max(bad) if bad else 0


def _max_restarts(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        for name in ("--max-restarts", "--max_restarts"):
            if a.startswith(name + "="):
                return int(a.split("=", 1)[1])
            if a == name and i + 1 < len(argv):
                return int(argv[i + 1])
    return 0


def _master(argv: list[str]) -> str:
    for a in argv:
        if a.startswith("--rdzv_endpoint=") or a.startswith("--rdzv-endpoint="):
            return a.split("=", 1)[1]
    return "node-rank 0"


def bound_agent(status_dir: Path, master: str, grace_s: float = AGENT_GRACE_S) -> None:
    """Thread body: end this process ``grace_s`` after its last worker ended (see the docstring)."""
    me, seen, gone_at = os.getpid(), 0, None  # seen: the most workers alive at once
    while True:
        time.sleep(1.0)
        kids = _children(me)
        if kids:
            seen, gone_at = max(seen, len(kids)), None
            continue
        if not seen:
            continue  # still in the first rendezvous: torchrun's join timeout bounds it
        gone_at = gone_at or time.monotonic()
        if time.monotonic() - gone_at >= grace_s:
            codes = worker_codes(status_dir)
            code = node_exit_code(codes)
            if code == 0 and len(codes) < seen:
                code = 1  # a worker died without a word (SIGKILL, the OOM killer)
            state = "finished" if code == 0 else f"ended (exit code {code})"
            print(
                f"launch: this node's workers {state} {grace_s:.0f} s ago and torchrun is still waiting "
                f"on the rendezvous store at {master} (that host is gone or unreachable, or still busy); "
                "ending the agent",
                file=sys.stderr,
                flush=True,
            )
            os._exit(code)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import main as torchrun_main

    status_dir = Path(tempfile.mkdtemp(prefix="invasive-dist-status-"))
    os.environ[STATUS_ENV] = str(status_dir)  # the workers inherit it
    if _max_restarts(argv) == 0:
        threading.Thread(target=bound_agent, args=(status_dir, _master(argv)), daemon=True).start()
    sys.argv = ["torchrun", *argv]
    try:
        torchrun_main(argv)
        return 0
    except ChildFailedError as e:
        # The first failure is the cause (torchrun then ends the other workers with SIGTERM): a
        # worker that explained it needs no banner, and its code is the node's.
        rank, first = e.get_first_failure()
        code = worker_codes(status_dir).get(rank)
        if code is not None and code == first.exitcode:
            return code
        raise
    except SignalException as e:
        # Slurm's preemption, scancel or time limit (or a kill): torchrun passed the signal to the
        # workers, which save and stop (exit 143), then re-raised it here. One line, no traceback.
        name = signal.Signals(e.sigval).name
        print(
            f"launch: torchrun got {name}; this node's workers were told to save and stop",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    except RendezvousConnectionError:
        # --max-restarts: the restart's rendezvous needs the store that node-rank 0's agent hosts;
        # with that host gone, no node can re-form the job (torch's c10d store is not replicated).
        print(
            f"launch: the rendezvous store at {_master(argv)} is gone (that host died or is unreachable): "
            "this node cannot re-form the job without it; continue with the command printed above",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
