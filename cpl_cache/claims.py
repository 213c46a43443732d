"""Per-cell claims, so that two `cpl-cache run`s on one results folder never train the same cell.

A run claims a cell by creating `.{result}.lock` beside its result file with O_EXCL, holding its pid,
and removes it when the cell is written (or the run ends). A lock whose process is gone is stale and
is taken over; leftover `.{result}.tmp-PID` files of dead processes (a kill between write and rename)
are removed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def lock_path(result: Path) -> Path:
    return result.with_name(f".{result.name}.lock")


def claim(result: Path) -> bool:
    """Claim the cell whose result file is `result`; False when a live process holds it."""
    lock = lock_path(result)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            if _alive(pid):
                return False
            with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def release(result: Path) -> None:
    """Give up a claim this process holds (a claim of another process is left alone)."""
    lock = lock_path(result)
    with contextlib.suppress(OSError, ValueError):
        if int(lock.read_text().strip() or "0") == os.getpid():
            lock.unlink()


def sweep(folder: Path) -> int:
    """Remove temporary files that dead processes left in `folder` and its subfolders; how many."""
    removed = 0
    if not Path(folder).is_dir():
        return 0
    for path in Path(folder).rglob(".*.tmp-*"):
        m = _TMP.match(path.name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed
