"""Faults, as the user sees them, in real kvrepl processes (started in the background by the
`jobs` fixture of conftest.py): killed around the turn's write, a second kvrepl on the same
session or the same store, a newer database, bad input and a bad session name on the real
command line, piped output and stdin from /dev/null.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3

import pytest
from fault_helpers import (
    ANSI,
    KILLS,
    STATS,
    assert_snapshot_clean,
    db_messages,
    fault_lines,
    files_outside,
    one_turn_ok,
)

from kvrepl.store.kvstore import KVStore
from kvrepl.store.schema import SCHEMA_VERSION

# =============================================================================================
# Real processes (started by the `jobs` fixture): kills, a second kvrepl, the CLI's refusals,
# terminals


@pytest.mark.parametrize("fault", KILLS)
def test_a_process_killed_around_the_turn_write_leaves_no_phantom_turn(fault, jobs, dir_loaded,
                                                                       make):  # fmt: skip
    done = jobs.wait(fault)
    assert done.rc == -signal.SIGKILL, done.err
    home = jobs.root / fault / "store"
    committed = db_messages(home)
    roles = [r for r, _, _ in committed]
    if fault.startswith("snapshot-then-kill"):
        # Turn 2's answer was never committed, but the snapshot on disk holds it: a phantom.
        assert roles == ["user", "assistant", "user"]
    else:  # turn 2 committed; its snapshot never written, or only half of its temp file
        assert roles == ["user", "assistant", "user", "assistant"]
        if fault.startswith("kill-mid-write"):
            pool = KVStore(home / "kv").pool_dir(dir_loaded.fingerprint)
            assert [n for n in os.listdir(pool) if n.startswith(".tmp-")]
    h = make(dir_loaded, home)
    out = h.line("/load k")  # the next start; the dead process's lock is gone with it
    assert "error" not in out, out
    assert fault_lines(out) == [], out  # a valid snapshot: older or newer than the database
    assert re.search(r"snapshot: restored [\d,]+ cached tokens", out), out
    # The history is exactly what was committed: no phantom answer, nothing lost.
    assert [(m.role, m.content) for m in h.chat.history()] == [(r, c) for r, c, _ in committed]
    assert "never read" not in [c for _, c, _ in committed]
    out = one_turn_ok(h, "The capital of France")  # equal to a no-reuse recomputation
    assert h.rt.engine.progress.reused > 0  # it kept what agrees
    assert [m.role for m in h.chat.history()][-2:] == ["user", "assistant"]
    assert_snapshot_clean(h)  # also: the half-written temp file of a killed save is gone


def test_a_second_kvrepl_on_the_same_session_is_refused(jobs):
    done = jobs.wait("held")
    assert done.rc == 1
    assert done.err == (f"kvrepl: this session is open in another kvrepl (pid {os.getpid()}); "
                        "close it there first\n")  # fmt: skip
    assert "hello there" not in [c for _, c, _ in db_messages(jobs.root / "held" / "store")]


def test_two_kvrepl_processes_writing_one_store_wait_for_each_other(jobs):
    for name in ("pair-a", "pair-b"):
        done = jobs.wait(name)
        assert done.rc == 0, done.err
        both = done.out + done.err
        assert "locked" not in both and "busy" not in both and "error" not in both
        assert len(STATS.findall(done.err)) == 3, done.err  # piped: the figures go to stderr
    con = sqlite3.connect(jobs.root / "shared-store" / "kvrepl.db")
    counts = dict(con.execute("SELECT s.name, count(*) FROM messages m JOIN sessions s "
                              "ON s.id = m.session_id GROUP BY s.name"))  # fmt: skip
    con.close()
    assert counts == {"pair-a": 6, "pair-b": 6}


def test_a_database_from_a_newer_kvrepl_is_refused_untouched(jobs):
    done = jobs.wait("schema")
    assert done.rc == 1 and done.out == ""
    assert done.err == ("kvrepl: this database was written by a newer kvrepl (schema 99; this "
                        f"one knows {SCHEMA_VERSION}); not touching it\n")  # fmt: skip
    assert (jobs.root / "schema" / "store" / "kvrepl.db").read_bytes() == jobs.data["schema"]


def test_bad_input_through_the_cli_is_replaced_or_refused(jobs):
    done = jobs.wait("badinput")
    assert done.rc == 1, done.err  # some lines were refused
    out, err = done.out, done.err
    assert "internal error" not in out + err and "Traceback" not in out + err
    assert not [ln for ln in out.splitlines() if ln.startswith("error:")]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: no session 'nosuch' (usage: /load name)",
        "error: unknown command /bogus: /help lists them",
        "error: a session name cannot contain '/' (a path separator)",
        "error: give the turn number (see /history) (usage: /edit N [text])",
    ]
    assert len(STATS.findall(err)) == 2 and not STATS.findall(out)
    assert "[1. you] \ufffd\ufffd hi" in out and "[2. you] hello there" in out  # /history's
    home = jobs.root / "badinput" / "store"
    users = [c for r, c, _ in db_messages(home) if r == "user"]
    assert users == ["\ufffd\ufffd hi", "hello there"]
    assert files_outside(jobs.root / "badinput", home) == {
        jobs.root / "badinput" / n for n in ("stdout", "stderr")
    }


def test_a_bad_session_name_on_the_real_command_line(jobs):
    done = jobs.wait("slashname")
    assert done.rc == 1 and done.out == ""
    assert done.err == "kvrepl: a session name cannot contain '/' (a path separator)\n"
    job = jobs.root / "slashname"
    assert files_outside(job, job / "store") == {job / "stdout", job / "stderr"}


def test_piped_input_and_output_run_in_line_mode(jobs):
    done = jobs.wait("echo-hi")
    assert done.rc == 0, done.err
    assert ANSI not in done.out and ANSI not in done.err
    # stdout holds the answer alone, as plain text; its figures go to stderr
    assert done.out.strip() and not STATS.findall(done.out)
    assert len(STATS.findall(done.err)) == 1
    assert done.err.splitlines()[-1].startswith("reused 0 · prefilled ")


def test_stdin_from_dev_null_exits_cleanly(jobs):
    done = jobs.wait("devnull")
    assert done.rc == 0, done.err
    assert ANSI not in done.out and "Traceback" not in done.err
