"""The K/V budget is the store's (issue "The promise proven where users stand"): given by
--kv-budget-mb, KVREPL_KV_BUDGET_MB or the config file, it reaches the pool's eviction; a save
that must cut another session's newest snapshot says so in one line, naming it, and that session
says on resume what it kept. No session can set it for itself (`/set` refuses it)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from helpers import make_harness
from session_helpers import TINY, TINY_FLAGS, session_turns

from kvrepl.app import cli
from kvrepl.store.kvstore import KVStore

HOW = {
    "flag": (["--kv-budget-mb", "0"], {}, ""),
    "environment": ([], {"KVREPL_KV_BUDGET_MB": "0"}, ""),
    "config file": ([], {}, "kv_budget_mb = 0\n"),
}


def chat_line(folder: Path, session: str, text: str, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch, *flags: str) -> str:  # fmt: skip
    """kvrepl (in process, line mode) answers one line in `session`; returns its stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))
    rc = cli.main(["--model", str(folder), "--session", session, *TINY_FLAGS, *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return err


@pytest.mark.parametrize("how", list(HOW))
def test_the_stores_budget_evicts_another_sessions_snapshot_and_says_so(
    how, tinies, tmp_path, capsys, monkeypatch
):
    home = tmp_path / "store"  # KVREPL_HOME (conftest)
    err = chat_line(tinies.folder, "a", "Hello there, how are you?", capsys, monkeypatch)
    a, _ = session_turns(home, "a")
    kept = KVStore(home / "kv").n_tokens_on_disk(a)
    assert kept > 20 and "snapshot: the K/V pool" not in err

    flags, env, config = HOW[how]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if config:
        (tmp_path / "config.toml").write_text(config)  # KVREPL_CONFIG (conftest)
    err = chat_line(tinies.folder, "b", "Tell me about caches.", capsys, monkeypatch, *flags)
    b, _ = session_turns(home, "b")
    (line,) = [ln for ln in err.splitlines() if ln.startswith("snapshot: the K/V pool")]
    said = re.fullmatch(r"snapshot: the K/V pool is over its budget \(kv_budget_mb 0\): dropped "
                        r"(\d+) cached tokens of older branches and of the newest snapshot of "
                        rf"session {a}", line)  # fmt: skip
    assert said and 0 < int(said.group(1)) <= kept, line
    store = KVStore(home / "kv")
    assert store.n_tokens_on_disk(a) < kept  # a's newest snapshot was cut ...
    assert store.n_tokens_on_disk(b) > 0 and store.load_session(b, tinies.a.fingerprint).ids
    # ... and a says so when it resumes, then answers from its messages.
    for name in env:
        monkeypatch.delenv(name)
    (tmp_path / "config.toml").unlink(missing_ok=True)
    err = chat_line(tinies.folder, "a", "And then?", capsys, monkeypatch)
    assert (
        "snapshot: dropped: another session's save needed the room (the store's K/V budget)"
        in err.splitlines()
    ), err


def test_no_session_sets_the_budget_for_itself(tiny_loaded_session):
    h = tiny_loaded_session
    out = h.line("/set kv_budget_mb 0")
    assert "unknown setting 'kv_budget_mb'" in out, out
    assert h.chat.settings.kv_budget_mb == 4096


@pytest.fixture
def tiny_loaded_session(tinies, tmp_path):
    h = make_harness(tmp_path / "store", tinies.a, settings=TINY)
    yield h
    h.close()
