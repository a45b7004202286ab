"""Atomic file writes: a reader (or a concurrent writer on a shared file system) sees the old file
or the new one, never half of one. Every write in the project that replaces a file goes through here.

    write_json(run_dir / "cv.json", summary)
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))   # any writer that takes a path
    atomic_write(ckpt, lambda tmp: torch.save(state, tmp), durable=True)   # survives power loss
    atomic_link(ckpt, folder / "last.pt", durable=True)              # a second name, atomically
    remove_stale_temps(folder)                                      # after a crash mid-write

The data goes to ``.<name>.<pid>.tmp`` beside the target (hidden, one name per process and target),
then ``os.replace`` renames it (atomic on POSIX within one file system); a failed write removes its
temp file. A process killed mid-write leaves its temp file behind: such files never carry a target's
name, :func:`is_temp` recognises them and :func:`remove_stale_temps` deletes them. ``durable=True``
(checkpoints) also fsyncs the file before the rename and the folder after it, so that after a power
loss the target holds the old bytes or all the new ones; small files (JSON, CSV, PNG, the images of
``synth``) skip it, as each fsync waits for the disk (milliseconds; more on a network file system).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_GLOB = ".*.tmp"  # a superset of the temp names; :func:`is_temp` is exact
_TEMP_RE = re.compile(r"^\..+\.\d+\.tmp$")


def temp_path(path: Path) -> Path:
    """The temp file a write to ``path`` goes through (hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temp(path: str | Path) -> bool:
    """True for the name of a temp file of :func:`atomic_write` (of any process)."""
    return bool(_TEMP_RE.match(Path(path).name))


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files left in ``folder`` by writes that never finished (a crashed process).

    Call it when no write into ``folder`` is in progress; returns the files it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(TEMP_GLOB) if is_temp(p) and not p.is_dir()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync flushes the inode, whichever descriptor wrote it
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    write: Callable[[Path], Any],
    durable: bool = False,
    fence: Callable[[], None] | None = None,
) -> Path:
    """Call ``write(tmp)``, then rename ``tmp`` to ``path`` (parents created). Returns ``path``.

    ``durable``: fsync the file before the rename and the folder after it. ``fence``: called
    right before the rename; whatever it raises cancels the write (the temp file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # a leftover of a crashed process that had the same pid
    try:
        write(tmp)
        if fence is not None:
            fence()  # also before the fsync: a new owner's first save removed our temp file
        if durable:
            _fsync(tmp)
        if fence is not None:
            fence()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)  # makes the rename itself survive a power loss
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dst)


def atomic_link(
    src: str | Path, dst: str | Path, durable: bool = False, fence: Callable[[], None] | None = None
) -> Path:
    """Make ``dst`` a hard link to ``src`` (a copy where links are not supported), atomically."""
    return atomic_write(dst, lambda tmp: _link_or_copy(Path(src), tmp), durable=durable, fence=fence)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")
