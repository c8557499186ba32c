"""Guards that keep a turn whole: Ctrl-C held back while a turn is written, and one writer per
session (an advisory lock file, so a snapshot never has two writers). No model, no SQL."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvrepl.errors import StoreError


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C while a turn is written (database commit, then snapshot), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class SessionLock:
    """One writer per session: an advisory lock file held while the session is open here."""

    def __init__(self, folder: Path, session_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{session_id}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise StoreError(
                f"this session is open in another kvrepl (pid {other}); close it there first"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self, *, remove: bool = False) -> None:
        """Let go; `remove` also deletes the lock file (the session itself is gone)."""
        if remove and self.fd >= 0:
            self.path.unlink(missing_ok=True)
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
