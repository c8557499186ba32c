"""Guards that keep a turn whole: the signals that stop kvrepl (Ctrl-C; SIGTERM and SIGHUP)
held back while a turn is written, SIGTERM and SIGHUP taken as Ctrl-C is (the turn under way is
kept, marked interrupted) and then ending kvrepl, and one writer per session (a lock file, through
filelock on every OS, so a snapshot never has two writers). No model, no SQL."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

from filelock import FileLock, Timeout

from kvrepl.errors import StoreError

# The signals that end kvrepl as an interrupt does (Windows has no SIGHUP).
ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                       if hasattr(signal, name))  # fmt: skip
_ended: list[int] = []  # the ending signals received while `ending_signals` is in force


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where kvrepl is, as Ctrl-C raises KeyboardInterrupt: a turn
    under way stops and is kept (marked interrupted, its snapshot saved) as after Ctrl-C; then
    kvrepl ends, with the exit status 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _on_ending_signal(signum: int, frame: FrameType | None) -> None:
    _ended.append(signum)
    raise Terminated(signum)


@contextmanager
def ending_signals() -> Iterator[None]:
    """While the block runs (kvrepl's main), SIGTERM and SIGHUP raise `Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _ended.clear()
    previous = {s: signal.signal(s, _on_ending_signal) for s in ENDING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_if_ended() -> None:
    """Raise `Terminated` again when an ending signal came (a turn takes it as its interrupt and
    ends quietly; kvrepl must still end)."""
    if _ended:
        raise Terminated(_ended[0])


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while a turn is written (database commit, then snapshot),
    then deliver each to the handler it had: Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP
    `Terminated` under `ending_signals` (elsewhere, their default: the process ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, *ENDING_SIGNALS)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # An ending signal first: it ends kvrepl, which a Ctrl-C held with it would not.
        for s in sorted(set(caught), key=lambda s: s == signal.SIGINT):
            signal.raise_signal(s)


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
