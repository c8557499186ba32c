"""Faults, as the user sees them: the disk and the database. A save that fails (disk full,
read-only store) warns and loses nothing; a second process writing the store is waited for; the
same session open twice is refused; a file that is not kvrepl's database is refused untouched.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time

import pytest
from fault_helpers import (
    STATS,
    assert_cache_true,
    assert_snapshot_clean,
    assert_whole_turns,
    chunk_files,
    db_messages,
    fault_lines,
    one_turn_ok,
)
from helpers import tree
from procs import PYTHON

from kvrepl.app import cli
from kvrepl.errors import StoreError

# =============================================================================================
# Disk full or read-only store during a save


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _erofs_on_create(real_open):
    def fake(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    return fake


@pytest.mark.parametrize("fault", ["fsync ENOSPC", "replace ENOSPC", "read-only store"])
def test_a_failed_save_warns_and_loses_nothing(fault, loaded, make, monkeypatch):
    h = make(loaded)
    h.lines("hello there", "how are you")
    sid = h.sid
    before = chunk_files(h.home, sid)
    kv_before = tree(h.home / "kv")
    with monkeypatch.context() as m:
        if fault == "fsync ENOSPC":
            m.setattr(os, "fsync", _enospc)
        elif fault == "replace ENOSPC":
            m.setattr(os, "replace", _enospc)
        else:
            m.setattr(os, "open", _erofs_on_create(os.open))
        out = h.line("The capital of France")
    warnings = [ln for ln in out.splitlines() if "warning" in ln]
    reason = "Read-only file system" if fault == "read-only store" else "No space left on device"
    assert len(warnings) == 1 and reason in warnings[0] and "messages are safe" in warnings[0], out
    assert len(STATS.findall(out)) == 1
    assert chunk_files(h.home, sid) == before  # the old snapshot, byte for byte
    assert tree(h.home / "kv") == kv_before  # and the whole store: no temp file, no list changed
    assert_whole_turns(h, 3)  # every message, the answer of the failed save's turn too
    assert [r for r, _, _ in db_messages(h.home)] == ["user", "assistant"] * 3
    assert_cache_true(h.rt.engine)
    one_turn_ok(h, "and Germany?")  # the REPL goes on, and the next save works
    assert_snapshot_clean(h)
    # A restart after the failed save starts from a valid snapshot too.
    h.close()
    h2 = make(h.loaded, h.home)
    h2.line(f"/load {sid}")
    assert fault_lines(h2.out.getvalue()) == []
    one_turn_ok(h2, "and Spain?")


# =============================================================================================
# The database: a second writer, the same session twice, a newer schema, not a database

HOLD_WRITE_LOCK = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE sessions SET title = title")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
"""


def test_a_second_process_writing_the_store_is_waited_for(loaded, make):
    h = make(loaded)
    h.line("hello there")
    holder = subprocess.Popen([str(PYTHON), "-c", HOLD_WRITE_LOCK, str(h.home / "kvrepl.db"),
                               "1.5"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        out = h.line("how are you")  # its first write waits for the other process's commit
        waited = time.monotonic() - t0
    finally:
        assert holder.wait(timeout=30) == 0
    assert "locked" not in out and "busy" not in out and "error" not in out, out
    assert waited >= 1.0
    assert len(STATS.findall(out)) == 1
    assert_whole_turns(h, 2)


def test_the_same_session_open_twice_is_refused_with_one_line(loaded, make):
    a = make(loaded)
    a.lines("/save shared", "hello there")
    b = make(loaded, a.home)  # a second kvrepl on the same store
    b.lines("/save mine", "how are you")
    out = b.line("/load shared")
    assert out.count("\n") == 1 and out.startswith("error: "), out
    assert f"this session is open in another kvrepl (pid {os.getpid()})" in out
    assert b.chat.session.name == "mine"
    one_turn_ok(b, "still here")  # the REPL goes on in its own session
    a.close()  # closed there: now it opens here
    out = b.line("/load shared")
    assert "error" not in out and b.chat.session.name == "shared"


def test_a_refused_load_keeps_the_current_session_locked(loaded, make):
    a = make(loaded)
    a.lines("/save shared", "hello there")
    b = make(loaded, a.home)
    b.lines("/save mine", "how are you")
    assert "error" in b.line("/load shared")
    c = make(loaded, a.home)
    with pytest.raises(StoreError, match="open in another kvrepl"):
        c.chat.sessions.open("mine")


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path, capsys):
    home = tmp_path / "store"
    home.mkdir()
    junk = os.urandom(5000)
    (home / "kvrepl.db").write_bytes(junk)
    assert cli.main(["--store", str(home), "sessions"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a kvrepl database" in err, err
    assert (home / "kvrepl.db").read_bytes() == junk


def test_another_programs_database_is_refused_untouched(tmp_path, capsys):
    home = tmp_path / "store"
    home.mkdir()
    con = sqlite3.connect(home / "kvrepl.db")
    con.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
    con.commit()
    con.close()
    data = (home / "kvrepl.db").read_bytes()
    assert cli.main(["--store", str(home), "sessions"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a kvrepl database" in err, err
    assert (home / "kvrepl.db").read_bytes() == data
