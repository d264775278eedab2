"""One writer per output: an exclusive, non-blocking lock beside the folder a command writes.

The lock is an OS file lock (flock), so it is released when its process dies, even by kill -9: a crashed run never
leaves a stale lock behind. The lock file is removed on release.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockedError(RuntimeError):
    """Another process holds the lock of the output asked for."""


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of `target` (a folder that may not exist yet) for the block; LockedError naming the holder's
    pid when another process holds it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{target} is being written by another process (pid {holder}); wait for it to finish "
                              "or choose another output") from None  # fmt: skip
        try:  # the file may have been removed by its previous holder between our open and our lock: retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
