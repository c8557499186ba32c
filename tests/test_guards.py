"""The one-writer-per-session lock (guards.SessionLock, on filelock): a second holder is refused
with the holder's pid, in this process or another; letting go frees it; `remove` leaves no file;
a holder killed with SIGKILL holds nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvrepl.chat.guards import SessionLock
from kvrepl.errors import StoreError

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "this session is open in another kvrepl (pid {}); close it there first"


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    first = SessionLock(tmp_path / "locks", "abc")
    with pytest.raises(StoreError) as refused:
        SessionLock(tmp_path / "locks", "abc")
    assert str(refused.value) == REFUSED.format(os.getpid())
    other = SessionLock(tmp_path / "locks", "other")  # another session: its own lock
    first.release()
    second = SessionLock(tmp_path / "locks", "abc")  # free again
    second.release()
    other.release()
    first.release()  # twice is harmless
    assert (tmp_path / "locks" / "abc.lock").exists()  # kept, as flock wants it, until rm


def test_remove_leaves_no_file_of_the_session(tmp_path):
    lock = SessionLock(tmp_path / "locks", "abc")
    lock.release(remove=True)
    assert list((tmp_path / "locks").iterdir()) == []


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kvrepl.chat.guards import SessionLock
lock = SessionLock(Path(sys.argv[2]), "abc")
print("held", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_is_refused_until_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(tmp_path / "locks")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError) as refused:
            SessionLock(tmp_path / "locks", "abc")
        assert str(refused.value) == REFUSED.format(holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The OS let go with the process: nothing to clean up by hand.
    SessionLock(tmp_path / "locks", "abc").release(remove=True)
