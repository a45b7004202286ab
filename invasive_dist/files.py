"""Atomic file writes: a reader (or a concurrent writer on a shared file system) sees the old file
or the new one, never half of one.

    write_json(run_dir / "cv.json", summary)
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))   # any writer that takes a path

The data goes to ``.<name>.<pid>.tmp`` beside the target, then ``os.replace`` renames it (atomic
on POSIX within one file system); a failed write removes its temp file. Checkpoints
(``checkpoint.py``) add an fsync of the file and the folder, which these small files do not need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_path(path: Path) -> Path:
    """The temp file a write to ``path`` goes through (hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)``, then rename ``tmp`` to ``path`` (parents created). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")
