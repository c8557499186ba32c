"""Guards that keep a turn whole: Ctrl-C held back while a turn is written, and one writer per
session (a lock file, through filelock on every OS, so a snapshot never has two writers).
No model, no SQL."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

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
    """One writer per session: a lock file held while the session is open here (filelock: an
    OS lock, so a killed kvrepl leaves nothing held). The holder's pid sits in a file beside it,
    since a waiting filelock may empty the lock file itself; it is only ever used in a message."""

    def __init__(self, folder: Path, session_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{session_id}.lock"
        self.pid_path = folder / f"{session_id}.pid"
        # Not thread-local: the lock belongs to the process, whichever thread lets it go.
        self._lock: FileLock | None = FileLock(self.path, timeout=0, thread_local=False)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise StoreError(
                f"this session is open in another kvrepl (pid {self._holder()}); "
                "close it there first"
            ) from None
        self.pid_path.write_text(str(os.getpid()), encoding="ascii")

    def _holder(self) -> str:
        try:
            return self.pid_path.read_text(encoding="ascii", errors="replace").strip() or "?"
        except OSError:
            return "?"

    def release(self, *, remove: bool = False) -> None:
        """Let go; `remove` also deletes the lock's files (the session itself is gone)."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        self.pid_path.unlink(missing_ok=True)
        lock.release()
        if remove:  # after the release: Windows cannot delete a file held open
            with suppress(OSError):
                self.path.unlink(missing_ok=True)
