"""A machine-wide lock on a file (flock): released by the kernel when its holder dies."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, *, when_busy: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the `with` block.

    When another process holds it, `when_busy` is called first (to say so, or to raise instead
    of waiting); then the lock is waited for.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if when_busy is not None:
                when_busy()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
