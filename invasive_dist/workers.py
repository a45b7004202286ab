"""The processes the torch backend starts for a rank (multiprocessing's forkserver and the DataLoader
workers forked from it): refused before they start when they would re-run the user's script, and
never outliving the rank.

    check_main_script()        # in the rank, before the forkserver starts: UserError or nothing
    with forkserver_tied():    # in the rank's main thread, around forkserver.ensure_running()
        ...
    tie_to_rank()              # in each worker, first thing (the DataLoader's worker_init_fn)

**The main script.** Every forkserver child runs the main script's top level again (multiprocessing
imports it as ``__mp_main__`` so that what it defines can be unpickled there). A script that calls
``invasive_dist.cli.main([...])`` at its top level, outside ``if __name__ == "__main__":``, would
then start a training in every decoding worker (each fails with "already holds a run", and the
rank with "DataLoader worker exited unexpectedly"); code read from standard input
(``python - <<EOF``) cannot be read again, and every worker dies with ``FileNotFoundError:
'<stdin>'``. :func:`check_main_script` finds both before a worker starts and says what to do. It
reads the script (``ast``) to see whether the statement now running at its top level is the
``if __name__ == "__main__":`` block; ``python -m invasive_dist``, the ``invasive-dist`` command,
``python -c`` and the REPL are never re-run.

**Lifetime.** The forkserver ends only when every holder of its "alive" pipe is gone, and the workers
hold it too, while a worker ends only when its parent (the forkserver) does or its rank tells it
to: after a rank was SIGKILLed, timed out or ended by the watchdog, the forkserver and its workers
stayed alive (parent 1, ~730 MB each, found minutes later after the fault tests). Now the
forkserver gets SIGKILL when the rank ends (Linux ``PR_SET_PDEATHSIG``, set when this module is
imported as the forkserver's first preload, see :func:`forkserver_tied`), each worker gets SIGKILL
when the forkserver ends, and each worker also watches its rank itself (a thread waiting on
multiprocessing's parent sentinel, a pipe from the rank that closes when the rank ends, on every
platform, also when the forkserver was started by someone else without the death signal). A
process whose parent is already gone when it sets the death signal ends at once.
tests/integration/test_orphans.py counts the survivors after a SIGKILL and after the watchdog.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

# Set by the rank around the forkserver's start (forkserver_tied): the rank's pid, read by this
# module when the forkserver imports it.
FORKSERVER_PARENT_ENV = "INVASIVE_DIST_FORKSERVER_PARENT"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
GUARD = 'if __name__ == "__main__":'


# ------------------------------------------------------------------------------------------------
# The main script.


def check_main_script() -> None:
    """Raise a UserError if the forkserver's children would re-run this process's main script in a
    way that breaks them (see the module docstring)."""
    main = sys.modules.get("__main__")
    if main is None:
        return
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        # multiprocessing re-runs a main module by name unless it is a package's __main__.
        if spec.name == "__main__" or spec.name.endswith(".__main__"):
            return
        path = spec.origin
    else:
        path = getattr(main, "__file__", None)
    if not path:
        return  # python -c, the REPL, a notebook: nothing is re-run
    if not os.path.isfile(path):
        raise UserError(
            f"the main script is {path!r} (read from standard input?): the torch backend's decoding "
            "workers (data.torch.num_workers > 0, started by multiprocessing's forkserver) read the "
            "main script again and cannot. Save the code in a file with the call under "
            f"`{GUARD}`, or run the `invasive-dist` command (or set data.torch.num_workers=0 to "
            "decode in this process)"
        )
    line = _running_top_level_line(main.__dict__)
    if line is not None and not _guarded(Path(path), line):
        raise UserError(
            f"{path}, line {line}: runs at the script's top level, outside `{GUARD}`: the torch "
            "backend's decoding workers (data.torch.num_workers > 0, started by multiprocessing's "
            "forkserver) run the main script's top level again, and each would start this command "
            f"again. Put the call under `{GUARD}` (or run the `invasive-dist` command)"
        )


def _running_top_level_line(main_globals: dict) -> int | None:
    """The line of the main script's top-level statement that is running now (the outermost frame
    of its module code), or None when the main script's top level is not on the stack."""
    line = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main_globals and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    return line


def _guarded(path: Path, line: int) -> bool:
    """Whether the top-level statement of ``path`` that holds ``line`` is an ``if`` on ``__name__``
    (a file that cannot be read or parsed counts as guarded: nothing is refused on a guess)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return True
    for stmt in tree.body:
        if stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
            return isinstance(stmt, ast.If) and any(
                isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(stmt.test)
            )
    return True


# ------------------------------------------------------------------------------------------------
# Lifetime.


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when the thread that started it ends (Linux; a no-op elsewhere). With
    ``parent_pid``: end now if the parent is no longer that process (it ended before this call)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return  # not permitted here: the workers' own watch still ends them
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


@contextlib.contextmanager
def forkserver_tied() -> Iterator[None]:
    """Around ``forkserver.ensure_running()`` in the rank's main thread: a forkserver started
    inside imports this module first (``set_forkserver_preload``) and dies with the rank. Only from
    the main thread: the death signal follows the thread that started the process, and another
    thread of the rank may end long before the rank does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = os.environ.get(FORKSERVER_PARENT_ENV)
    os.environ[FORKSERVER_PARENT_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FORKSERVER_PARENT_ENV, None)
        else:
            os.environ[FORKSERVER_PARENT_ENV] = old


def tie_to_rank() -> None:
    """In a decoding worker: SIGKILL when the forkserver (its parent) ends, and end when the rank
    (the process that asked for it) ends, which a daemon thread waits for."""
    die_with_parent()
    rank = multiprocessing.parent_process()
    if rank is None:
        return
    sentinel = rank.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])  # readable (EOF) once the rank is gone
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="invasive-dist-rank-watch", daemon=True).start()


def _on_import_in_forkserver() -> None:
    value = os.environ.pop(FORKSERVER_PARENT_ENV, None)  # not inherited by the workers
    if value and multiprocessing.parent_process() is None and sys.argv[:1] == ["-c"]:
        die_with_parent(int(value))


_on_import_in_forkserver()
