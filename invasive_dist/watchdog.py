"""Stop and wedge handling for the trainer: a signal becomes a checkpoint, a wait never lasts forever.

    watch = Watchdog(rank, timeout_s=cfg.dist.timeout_s)
    stop = StopFlag(world_size, cfg.dist.timeout_s, watch)   # SIGTERM/SIGUSR1 -> flag
    with watch.waiting("data (training batch)"):
        batch = next(it)
    if stop.agreed(): ...                                    # all ranks, same step boundary
    stop.close()

**StopFlag.** SIGTERM/SIGUSR1 set a flag in the trainer's main process (DataLoader workers restore
the default handlers, see ``data/torch_backend.py``). Ranks agree on it with an all-reduce (MAX) on
a gloo group of their own: host memory, no device sync, and the group's own timeout. Measured on
the 2-core CPU machine, 2 processes under torchrun, demo data and model: about 0.5% of a step (see
``StopFlag.agreed``).

**Watchdog.** A daemon thread bounds the waits of the main thread that may never end: a batch from
the data workers, a collective, the checkpoint (gather, write, barrier). A wait armed with
:meth:`Watchdog.waiting` that lasts longer than its bound (``dist.timeout_s``) ends the process
with exit code 1 and a message naming the rank, what it waited for and how long, followed by the
Python stack of every thread (``faulthandler``); the launcher then ends the other ranks. The last
checkpoint is untouched (checkpoints are written atomically).

A signal that arrives while the main thread is blocked inside C++ (a gloo or NCCL collective whose
peer is gone, a queue of dead workers) would only run its Python handler when the call returns,
i.e. after ``dist.timeout_s`` (600 s by default), long after the launcher's grace period (torchrun
and Slurm: 30 s, then SIGKILL). So the thread also listens to the signal wake-up fd: if the main
thread stays blocked in one bounded wait for :data:`SIGNAL_GRACE_S` seconds after SIGTERM/SIGUSR1
(short of the step boundary where it would save), the thread ends the process the same way (exit
143; the last checkpoint is the one to resume from).
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from .distributed import is_peer_failure, record_exit
from .errors import EXIT_PREEMPTED

# torchrun and Slurm (KillWait) give 30 s between SIGTERM and SIGKILL; 20 s leaves 10 s for the
# dump and the exit. A step boundary is normally seconds away (demo: ~1 s per step on 2 CPU cores).
SIGNAL_GRACE_S = 20.0
# A collective on a group with the same timeout fails by itself first, with its own error, which is
# then reported with the rank and the collective's name; the watchdog is the backstop.
COLLECTIVE_MARGIN_S = 5.0
EXIT_WEDGED = 1
_POLL_S = 1.0  # the thread checks its deadlines at least this often


class Watchdog:
    """Bounds the main thread's waits; see the module docstring."""

    def __init__(self, rank: int, timeout_s: float, signal_grace_s: float = SIGNAL_GRACE_S) -> None:
        self.rank, self.timeout_s, self.signal_grace_s = rank, float(timeout_s), signal_grace_s
        self._lock = threading.Lock()
        self._what = ""
        self._since = 0.0
        self._grace = True
        self._deadline = math.inf
        self._signal_at = math.inf  # when SIGTERM/SIGUSR1 first arrived
        self._signal_name = ""
        self._closed = threading.Event()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._old_wakeup_fd: int | None = None
        if threading.current_thread() is threading.main_thread():
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="invasive-dist-watchdog", daemon=True)
        self._thread.start()

    # -- the main thread's side -------------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self, what: str, timeout_s: float | None = None, signal_grace: bool = True) -> Iterator[None]:
        """Bound the wait inside the block: past ``timeout_s`` (default ``dist.timeout_s``) the
        process ends with a message naming ``what``. ``signal_grace=False`` for the work a stop
        signal asks for (the checkpoint): the launcher's own timeout then governs."""
        now = time.monotonic()
        with self._lock:
            self._what, self._since, self._grace = what, now, signal_grace
            self._deadline = now + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._what, self._deadline = "", math.inf

    def iterate(self, what: str, iterable: Iterable) -> Iterator:
        """``iterable``'s items, each ``next`` a bounded wait."""
        it = iter(iterable)
        while True:
            with self.waiting(what):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def report(self, what: str, waited_s: float, detail: str = "", code: int = EXIT_WEDGED) -> None:
        """Print what this rank waited for and every thread's Python stack, then end the process
        (``os._exit``: a wedged thread must not be able to hold the exit)."""
        main = threading.main_thread().ident or 0
        msg = (
            f"error: rank {self.rank} waited {waited_s:.0f} s for {what}"
            f"{': ' + detail if detail else ''}; ending the job (the last checkpoint is intact). "
            f"Python stacks follow; the main thread is 0x{main:016x}."
        )
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        record_exit(code)  # the launcher passes the code on, without its own banner
        try:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        finally:
            os._exit(code)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wsock.send(b"\0")  # wake the thread now rather than at its next poll
        if self._old_wakeup_fd is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        self._thread.join(timeout=2 * _POLL_S)
        self._rsock.close()
        self._wsock.close()

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        stop_signals = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGUSR1): "SIGUSR1"}
        while not self._closed.is_set():
            with self._lock:
                deadline = self._deadline
                if self._what and self._grace and not math.isinf(self._signal_at):
                    deadline = min(deadline, max(self._since, self._signal_at) + self.signal_grace_s)
            wait = min(_POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                ready, _, _ = select.select([self._rsock], [], [], wait)
                data = self._rsock.recv(64) if ready else b""
            except (OSError, ValueError):  # closed under us
                return
            now = time.monotonic()
            with self._lock:
                for signum in data:
                    if signum in stop_signals and math.isinf(self._signal_at):
                        self._signal_at, self._signal_name = now, stop_signals[signum]
                what, since, armed = self._what, self._since, bool(self._what) and self._grace
                wedged = now >= self._deadline
                # Blocked in one wait for the grace period since the signal (or since the wait
                # began, if it began later): the Python handler cannot run, the step boundary
                # where the trainer saves is out of reach.
                late = armed and now >= max(since, self._signal_at) + self.signal_grace_s
            if self._closed.is_set():
                return
            if wedged:
                self.report(what, now - since)
            if late:
                detail = (
                    f"{self._signal_name} arrived {now - self._signal_at:.0f} s ago and this rank is "
                    "still blocked, short of the step boundary where it would save"
                )
                self.report(what, now - since, detail, code=EXIT_PREEMPTED)


class _NoWatchdog:
    """No bound: what the trainer uses outside ``fit()`` (e.g. ``evaluate`` from ``cv``)."""

    def waiting(
        self, what: str, timeout_s: float | None = None, signal_grace: bool = True
    ) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def iterate(self, what: str, iterable: Iterable) -> Iterable:
        return iterable


NO_WATCHDOG = _NoWatchdog()


class StopFlag:
    """Set by SIGTERM/SIGUSR1; ranks agree on it with an all-reduce on a gloo group."""

    def __init__(self, world_size: int, timeout_s: int, watchdog: Watchdog) -> None:
        self.flag = False
        self.signal_name = ""
        self.watchdog = watchdog
        self.timeout_s = timeout_s
        # The group's own timeout: gloo's default (30 min) would let a hung peer hold the job.
        timeout = timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank got a stop signal; called by every rank at the same step boundary.

        Cost, measured on the 2-core CPU machine (load average ~9, 2 processes under torchrun, gloo):
        the all-reduce itself takes 0.12 ms (median; p90 3 ms) when both ranks arrive together; in
        the demo run (ResNet-18, 128 px, batch 32, ~2 s per step) a call took 10-11 ms (median),
        mostly one rank waiting for the other, which the next step's gradient all-reduce would wait
        for anyway: about 0.5% of a step. Cheap enough to agree every step, which keeps the stop
        one step after the signal rather than up to ``train.log_every`` steps."""
        if self.group is None:
            return self.flag
        what = "a collective (the stop-flag all-reduce)"
        t = torch.tensor([1 if self.flag else 0], dtype=torch.int32)
        t0 = time.monotonic()
        with self.watchdog.waiting(what, self.timeout_s + COLLECTIVE_MARGIN_S):
            try:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            except RuntimeError as e:  # a peer is gone or hung: cli.main says which, and how to continue
                if not is_peer_failure(e):
                    self.watchdog.report(what, time.monotonic() - t0, str(e).strip().splitlines()[0][:400])
                raise
        return bool(t.item())

    def close(self) -> None:
        """Restore the signal handlers, close the watchdog and destroy the gloo group. Every rank
        calls it at the same point (the end of ``Trainer.fit``, after the last collective on the
        group); destroying a group is local (no collective), so a rank that leaves early through an
        error does not wait here. ``cv`` makes one StopFlag per fold and pseudo-label round in one
        process: without this, their groups (each with its sockets to every peer) would pile up."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        self.watchdog.close()
        if self.group is not None:
            group, self.group = self.group, None
            if dist.is_initialized():
                dist.destroy_process_group(group)

    restore = close  # the name train.py used
