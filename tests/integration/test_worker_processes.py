"""The torch backend's worker processes (multiprocessing's forkserver and the DataLoader workers), with
real processes: refused before they start when they would re-run the user's script, and never alive
after their rank (invasive_dist/workers.py).

The runs use the shipped default of 2 decoding workers. The processes a run starts are found by a
variable that only that run's environment holds (the forkserver inherits it from the rank, the
workers from the forkserver): after the rank is gone, none of them may be left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from invasive_dist.errors import EXIT_USER_ERROR

from ..conftest import FAST_TRAIN, ROOT
from ..procs import clean_env

MARK = "INVASIVE_DIST_TEST_RUN"
GONE_WITHIN_S = 10  # the rank's processes must be gone this long after it is (they go in ~0.1 s)


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [*FAST_TRAIN, "data.image_size=32", f"data.root={data}", f"output.root={out}", *extra]


def _marked(mark: str) -> list[psutil.Process]:
    """The live processes whose environment holds ``MARK=mark`` (zombies are dead: only their exit
    status is left, for a parent to collect)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == mark:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"pid {p.pid} parent {p.ppid()}: {' '.join(p.cmdline())[:150]}")
        except psutil.NoSuchProcess:
            pass
    return "\n".join(lines)


def _left_after(mark: str, rank: subprocess.Popen) -> list[psutil.Process]:
    """The run's processes still alive ``GONE_WITHIN_S`` after its rank ended (killed after the
    check, so that a failure leaves nothing behind either)."""
    rank.wait(timeout=60)
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def _train(tmp_path: Path, tiny_data: Path, *extra: str, fault: str | None = None):
    mark = uuid.uuid4().hex
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 (closed by the test)
    proc = subprocess.Popen(
        [sys.executable, "-m", "invasive_dist", "train", *_overrides(tiny_data, tmp_path, *extra)],
        cwd=ROOT,
        env=clean_env(fault, {MARK: mark}),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, mark, log


def test_sigkilled_rank_leaves_no_forkserver_or_worker(tmp_path, tiny_data):
    """SIGKILL of a training rank mid-epoch: its forkserver and DataLoader workers end with it (they
    used to stay, parent 1, ~730 MB each)."""
    proc, mark, log = _train(tmp_path, tiny_data, "train.epochs=50")
    try:
        deadline = time.monotonic() + 300  # start-up on a loaded machine
        # The rank, multiprocessing's resource tracker, the forkserver and 2 workers.
        while len(_marked(mark)) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        started = _marked(mark)
        assert any("forkserver" in " ".join(p.cmdline()) for p in started), _describe(started)
        proc.send_signal(signal.SIGKILL)
        left = _left_after(mark, proc)
        assert not left, f"alive {GONE_WITHIN_S} s after their rank was SIGKILLed:\n{_describe(left)}"
    finally:
        proc.kill()
        log.close()


@pytest.mark.slow
def test_rank_ended_by_the_watchdog_leaves_no_worker(tmp_path, tiny_data):
    """A worker that sleeps forever (a wedged decode): the watchdog ends the rank after
    ``dist.timeout_s``, and the sleeping worker, its sibling and the forkserver end with it."""
    # 48 training images, batch 8, units of 4: worker 0 decodes 4 samples per step; its 9th is in
    # step 3. 30 s: the bound of the wedge tests (test_faults.py), covering the workers' start-up.
    proc, mark, log = _train(tmp_path, tiny_data, "dist.timeout_s=30", fault="data_hang@9")
    try:
        rc = proc.wait(timeout=400)
        out = (tmp_path / "train.log").read_text()
        assert rc == 1 and "error: rank 0 waited" in out, out[-3000:]
        left = _left_after(mark, proc)
        assert not left, f"alive {GONE_WITHIN_S} s after the watchdog ended their rank:\n{_describe(left)}"
    finally:
        proc.kill()
        log.close()


# ------------------------------------------------------------------------------------------------
# A script that calls the package from Python.

CALL = "main(['train', *{args!r}])"


def _script(tmp_path: Path, tiny_data: Path, guarded: bool) -> str:
    args = _overrides(tiny_data, tmp_path / "runs", "train.epochs=1")
    body = f"raise SystemExit({CALL.format(args=args)})"
    if guarded:
        body = 'if __name__ == "__main__":\n' + textwrap.indent(body, "    ")
    return f"from invasive_dist.cli import main\n\n{body}\n"


def _run_python(argv: list[str], stdin: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        input=stdin,
        cwd=tmp_path,
        env=clean_env(extra={"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_unguarded_script_is_refused_before_workers_start(tmp_path, tiny_data):
    """``main([...])`` at a script's top level: every forkserver worker would run the script again
    and start the training again ("already holds a run", then "DataLoader worker exited
    unexpectedly"). Refused with what to do, before any worker starts."""
    script = tmp_path / "my_train.py"
    script.write_text(_script(tmp_path, tiny_data, guarded=False))
    r = _run_python([str(script)], None, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_USER_ERROR, out[-3000:]
    assert f"{script}, line 3: runs at the script's top level" in out, out[-3000:]
    assert 'Put the call under `if __name__ == "__main__":`' in out, out[-3000:]
    assert "already holds a run" not in out and "exited unexpectedly" not in out, out[-3000:]


def test_script_from_stdin_is_refused_before_workers_start(tmp_path, tiny_data):
    """``python - <<EOF``: the workers cannot read '<stdin>' again (they died on FileNotFoundError)."""
    r = _run_python(["-"], _script(tmp_path, tiny_data, guarded=True), tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_USER_ERROR, out[-3000:]
    assert "the main script is '<stdin>'" in out and "Save the code in a file" in out, out[-3000:]
    assert "FileNotFoundError" not in out, out[-3000:]


@pytest.mark.slow
def test_guarded_script_trains(tmp_path, tiny_data):
    """The documented form (README.md, under "Commands") trains with the default workers."""
    script = tmp_path / "my_train.py"
    script.write_text(_script(tmp_path, tiny_data, guarded=True))
    r = _run_python([str(script)], None, tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "best val/auc" in r.stdout, r.stdout[-3000:]
