"""Progress of long phases and ETAs: a bar on a terminal, plain periodic lines in a log file.

    with Progress("data check", total=len(jobs), unit="img", enabled=is_main) as p:
        for job in jobs:
            ...
            p.update(1)

    for batch in track(loader.iter_epoch(0), "validation", total=n_batches, unit="batch"):
        ...

    eta = ETA(total=1000, done=200)     # steps; done = where a resumed run starts
    eta.line(450)                       # '0:42' once steps have been timed, '?' before

On a terminal (the stream is a TTY) the bar is redrawn in place at most 10 times a second:
``data check  45%|#########           | 450/1000 img [0:12<0:15, 36.1 img/s]``. Otherwise (a log file,
Slurm's ``--output``, a pipe) a plain line is written every ``interval_s`` seconds (default 30;
``INVASIVE_DIST_PROGRESS_S`` overrides it) and, for a phase that took longer than 2 s, one line
when it ends, so a log shows a phase is alive without being flooded. Output goes to stderr: stdout
keeps what commands print as results. ``enabled=False`` prints nothing; the default (None) is
True on the main process (rank 0) only.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from .distributed import world_info_from_env

T = TypeVar("T")

DEFAULT_INTERVAL_S = 30.0  # log files: one line per 30 s keeps an hour-long phase to 120 lines
_TTY_REFRESH_S = 0.1  # a terminal bar redraws at most 10 times a second
_QUIET_BELOW_S = 2.0  # log files: phases shorter than this print no closing line
_BAR_WIDTH = 20


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``, None or not finite -> ``'?'``."""
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _interval_from_env() -> float:
    try:
        return float(os.environ.get("INVASIVE_DIST_PROGRESS_S", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def is_main_process() -> bool:
    """Rank 0 of the launch (or no launcher): the process that shows progress by default."""
    try:
        return world_info_from_env().is_main
    except Exception:  # a malformed RANK is reported where the world is built, not here
        return True


class ETA:
    """Remaining time of ``total`` units from the rate measured since this object was made.

    ``done`` is where the count starts (a resumed run's global step), so the rate counts only the
    units timed here."""

    def __init__(self, total: int, done: int = 0, clock=time.monotonic) -> None:
        self.total, self.start_done, self._clock = total, done, clock
        self.t0 = clock()

    def remaining_s(self, done: int) -> float | None:
        timed = done - self.start_done
        if timed <= 0:
            return None
        rate = timed / max(self._clock() - self.t0, 1e-9)
        return max(self.total - done, 0) / rate

    def line(self, done: int) -> str:
        return format_duration(self.remaining_s(done))


class Progress:
    """A phase with a known (or unknown: ``total=None``) amount of work; see the module docstring."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        interval_s: float | None = None,
        clock=time.monotonic,
    ) -> None:
        if enabled is None:
            enabled = is_main_process()
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = _interval_from_env() if interval_s is None else interval_s
        self._clock = clock
        self.n = 0
        self.lines = 0  # plain lines written so far
        self.t0 = self._last = clock()

    # -- the API --------------------------------------------------------------------------------
    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        now = self._clock()
        if self.tty:
            if now - self._last >= _TTY_REFRESH_S or self._finished():
                self._draw(now)
        elif now - self._last >= self.interval_s:
            self._write_line(now)

    def close(self) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if self.tty:
            self._draw(now)
            self.stream.write("\n")
            self.stream.flush()
        elif self.lines or now - self.t0 >= _QUIET_BELOW_S:
            self._write_line(now, done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- formatting -----------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.total is not None and self.n >= self.total

    def _rate_eta(self, now: float) -> tuple[float, float | None]:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.n / elapsed
        eta = (self.total - self.n) / rate if self.total is not None and rate > 0 else None
        return rate, eta

    def text(self, now: float | None = None, done: bool = False) -> str:
        """The plain line: ``[data check] 450/1000 img (45%), 36.1 img/s, elapsed 0:12, ETA 0:15``."""
        now = self._clock() if now is None else now
        rate, eta = self._rate_eta(now)
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = "done" if done else f"ETA {format_duration(eta)}"
        return (
            f"[{self.desc}] {count} {self.unit}{pct}, {rate:.1f} {self.unit}/s, "
            f"elapsed {format_duration(now - self.t0)}, {tail}"
        )

    def _write_line(self, now: float, done: bool = False) -> None:
        self.stream.write(self.text(now, done) + "\n")
        self.stream.flush()
        self.lines += 1
        self._last = now

    def _draw(self, now: float) -> None:
        rate, eta = self._rate_eta(now)
        if self.total:
            frac = min(self.n / self.total, 1.0)
            fill = int(frac * _BAR_WIDTH)
            bar = f"{100 * frac:3.0f}%|{'#' * fill}{' ' * (_BAR_WIDTH - fill)}| {self.n}/{self.total}"
        else:
            bar = f"{self.n}"
        line = (
            f"{self.desc} {bar} {self.unit} "
            f"[{format_duration(now - self.t0)}<{format_duration(eta)}, {rate:.1f} {self.unit}/s]"
        )
        self.stream.write("\r" + line + "\x1b[K")  # \x1b[K clears what a longer line left
        self.stream.flush()
        self._last = now


def track(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool | None = None,
    stream: IO[str] | None = None,
    interval_s: float | None = None,
) -> Iterator[T]:
    """Yield ``items``, counting each one as a unit of progress."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled, stream, interval_s) as p:
        for item in items:
            yield item
            p.update(1)
