"""Exclusive advisory locks on files in the data dir (one process owns a resource).

``flock`` is tied to the open file: the OS releases it when the process dies,
even by kill -9, so a stale lock never blocks a restart. The holder's pid is
written into the file, for the error message of whoever comes second.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path, in_use: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``path`` exclusively; raise ``in_use(holder_pid)`` if another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; one process per data dir by convention
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise in_use(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
