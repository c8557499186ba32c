"""The command line (issue 3): `kvrepl path` (the store in the user's data folder, the config
file in the user's config folder), `sessions`, `export`, `rm`, and the session name given to
`--session`. Subcommands run in-process through `cli.main` on a store made by a `Conversation`
over the tiny model; exit codes and the one-line errors are checked in real processes too (they
start in well under a second: no model is loaded)."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import platformdirs
import pytest
from helpers import close_conversation, open_conversation
from procs import Done, run_kvrepl

from kvrepl.app import cli
from kvrepl.app.listing import format_size
from kvrepl.chat.guards import SessionLock
from kvrepl.config import Settings, load_settings
from kvrepl.engine.models import LoadedModel, ModelSource
from kvrepl.events import Stats
from kvrepl.store.db import STAT_NAMES, Store
from kvrepl.store.kvstore import KVStore

TINY = Settings(temperature=0.0, max_tokens=8, repetition_penalty=3.0)
FP = "tiny-fingerprint"


@pytest.fixture
def home(_isolated_home: Path) -> Path:
    return _isolated_home  # KVREPL_HOME, set by conftest for every test


def tiny_loaded(tiny) -> LoadedModel:
    model, tok = tiny
    return LoadedModel(model, tok, ModelSource("folder", Path("/nonexistent/tiny"), "tiny"),
                       "cpu", "float32", FP, 512)  # fmt: skip


def converse(tiny, home: Path, name: str | None, *lines: str) -> tuple[str, list[Stats]]:
    """A session made the way the REPL makes it: a Conversation answers each line, then closes."""
    chat = open_conversation(tiny_loaded(tiny), home, TINY)
    try:
        if name:
            chat.sessions.open_or_create(name)
        stats = []
        for line in lines:
            turn = chat.send(line)
            list(turn)
            stats.append(turn.result.stats)
        assert chat.session is not None
        return chat.session.id, stats
    finally:
        close_conversation(chat)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def kvrepl(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> Done:
    """kvrepl ARGV in a real process, stdin /dev/null (no model is loaded: it starts in well
    under a second)."""
    return run_kvrepl(list(argv), cwd=cwd, env=env, stdin=None, timeout=120)


def tree(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under root (relative), except those under `skip`."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            out.add(str(p.relative_to(root)))
    return out


# ---------------------------------------------------------------------------------------------
# kvrepl path


def test_path_defaults_to_the_users_data_folder_whatever_the_working_folder(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("KVREPL_HOME")
    want = Path(platformdirs.user_data_dir("kvrepl", False))
    assert want == tmp_path / "xdg-data" / "kvrepl"  # conftest's XDG_DATA_HOME, on Linux
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        assert run_main(capsys, "path") == (0, f"{want}\n", "")
        assert list((tmp_path / folder).iterdir()) == []  # no sessions/ of its own
    assert not want.exists()  # printing the path creates nothing


def test_path_follows_kvrepl_home(home, capsys):
    assert run_main(capsys, "path") == (0, f"{home}\n", "")


def test_path_store_flag_wins_over_kvrepl_home(home, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(capsys, "--store", "elsewhere", "path") == (
        0,
        f"{tmp_path / 'elsewhere'}\n",
        "",
    )
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert run_main(capsys, "--store", "~/kv", "path") == (0, f"{tmp_path / 'me' / 'kv'}\n", "")


def test_path_in_a_real_process(tmp_path):
    """Started from two folders with no KVREPL_HOME, kvrepl finds one store, the user's."""
    xdg = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        p = kvrepl("path", cwd=tmp_path / folder, env=xdg)
        assert (p.rc, p.out, p.err) == (0, f"{tmp_path / 'data' / 'kvrepl'}\n", "")
    p = kvrepl("path", "--config", cwd=tmp_path, env=xdg)
    assert (p.rc, p.out) == (0, f"{tmp_path / 'config' / 'kvrepl' / 'config.toml'}\n")
    p = kvrepl("--store", str(tmp_path / "s"), "path", cwd=tmp_path,
               env={"KVREPL_HOME": str(tmp_path / "h")})  # fmt: skip
    assert (p.rc, p.out) == (0, f"{tmp_path / 's'}\n")


def test_path_config_follows_kvrepl_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVREPL_CONFIG", str(tmp_path / "my.toml"))
    assert run_main(capsys, "path", "--config") == (0, f"{tmp_path / 'my.toml'}\n", "")
    monkeypatch.delenv("KVREPL_CONFIG")
    want = Path(platformdirs.user_config_dir("kvrepl", False)) / "config.toml"
    assert run_main(capsys, "path", "--config") == (0, f"{want}\n", "")


def test_settings_come_from_the_users_config_file_not_the_store(home, tmp_path, monkeypatch):
    monkeypatch.delenv("KVREPL_CONFIG")
    config = Path(platformdirs.user_config_dir("kvrepl", False)) / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("temperature = 0.7\ntop_k = 5\n")
    home.mkdir()
    (home / "config.toml").write_text("temperature = 0.1\n")  # the old place: not read
    monkeypatch.setenv("KVREPL_TOP_K", "9")
    settings = load_settings({"temperature": None})
    assert (settings.temperature, settings.top_k) == (0.7, 9)  # the file, then the environment
    monkeypatch.setenv("KVREPL_CONFIG", str(tmp_path / "other.toml"))
    (tmp_path / "other.toml").write_text("temperature = 1.5\n")
    assert load_settings({"temperature": 0.3}).temperature == 0.3  # a flag wins
    assert load_settings().temperature == 1.5


# ---------------------------------------------------------------------------------------------
# kvrepl sessions


def test_sessions_lists_name_title_turns_tokens_cached_size_and_updated(tiny, home, capsys):
    first = "The capital of France is Paris. " * 3
    sid, stats = converse(tiny, home, "demo", first, "Hello there")
    other, _ = converse(tiny, home, None, "how are you?")  # unnamed: listed by its id
    rc, out, err = run_main(capsys, "sessions")
    assert rc == 0
    rows = [line.split("\t") for line in out.splitlines()]
    store, kv = Store(home / "kvrepl.db"), KVStore(home / "kv")
    try:
        want = []
        for session_id, turns in ((other, 1), (sid, 2)):  # most recently updated first
            s = store.get_session(session_id)
            assert s is not None
            tokens = store.summary(session_id).tokens
            assert tokens > 0
            want.append([s.name or s.id, s.title, str(turns), str(tokens), str(tokens),
                         format_size(kv.size_bytes(session_id)), s.updated])  # fmt: skip
        # the two sessions share the template's opening chunk: the pool is less than the sum
        pool = kv.pool_bytes()
        assert pool < kv.size_bytes(sid) + kv.size_bytes(other)
    finally:
        store.close()
    assert rows == want
    last = stats[-1]  # the conversation: the last answer's prompt and answer
    assert int(rows[1][3]) == last.reused_tokens + last.prefilled_tokens + last.generated_tokens
    assert rows[1][:3] == ["demo", " ".join(first.split())[:59].rstrip() + "…", "2"]
    assert rows[0][0] == other and rows[0][1] == "how are you?"
    assert err == f"all sessions: {format_size(pool)} of K/V on disk; a chunk sessions share " \
                  "counts in each one's \"on disk\", once here\n"  # fmt: skip


def test_sessions_with_json_is_one_json_array(tiny, home, capsys):
    sid, _ = converse(tiny, home, "demo", "Hello there")
    rc, out, err = run_main(capsys, "--json", "sessions")
    assert (rc, err) == (0, "")
    (row,) = json.loads(out)
    store, kv = Store(home / "kvrepl.db"), KVStore(home / "kv")
    try:
        summary = store.summary(sid)
        assert row == {"id": sid, "name": "demo", "title": "Hello there", "turns": 1,
                       "tokens": summary.tokens, "cached_tokens": summary.tokens,
                       "bytes_on_disk": kv.size_bytes(sid), "updated": summary.updated}  # fmt: skip
    finally:
        store.close()
    assert run_main(capsys, "sessions", "--json")[1] == out  # after the subcommand too


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sessions_in_a_terminal_shows_updated_as_local_minutes(tiny, home, monkeypatch):
    sid, _ = converse(tiny, home, "demo", "Hello there")
    store = Store(home / "kvrepl.db")
    session = store.get_session(sid)
    store.close()
    assert session is not None
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["sessions"]) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "demo" in text
    local = datetime.fromisoformat(session.updated).astimezone().strftime("%Y-%m-%d %H:%M")
    assert local in text and session.updated not in text


def test_sessions_on_an_empty_store(home, capsys):
    assert run_main(capsys, "sessions") == (0, "", "")


# ---------------------------------------------------------------------------------------------
# kvrepl export


def test_export_json_holds_each_turns_stats_under_the_five_names(tiny, home, capsys):
    sid, stats = converse(tiny, home, "demo", "Hello there", "The capital of France?")
    rc, out, err = run_main(capsys, "export", "demo", "--format", "json")
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["session"]["name"] == "demo" and doc["session"]["id"] == sid
    msgs = doc["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs[::2]] == ["Hello there", "The capital of France?"]
    assert all("stats" not in m for m in msgs[::2])
    for m, s in zip(msgs[1::2], stats, strict=True):
        assert list(m["stats"]) == list(STAT_NAMES)
        assert m["stats"] == s.as_dict()
        assert m["stats"]["prefilled_tokens"] > 0 and m["stats"]["generated_tokens"] > 0
    assert stats[1].reused_tokens > 0  # the second turn reused the first one's cache


def test_export_markdown_holds_each_turns_stats(tiny, home, capsys):
    _, stats = converse(tiny, home, "demo", "Hello there", "The capital of France?")
    rc, out, err = run_main(capsys, "export", "demo", "--format", "md")
    assert (rc, err) == (0, "")
    assert out.startswith("# demo\n")
    assert "## 1. user\n\nHello there\n" in out and "## 2. user\n\nThe capital of France?\n" in out
    assert out.count("### assistant") == 2
    for s in stats:
        line = (f"*reused {s.reused_tokens} · prefilled {s.prefilled_tokens} · generated "
                f"{s.generated_tokens} · ttft {s.ttft_s} s · {s.decode_tok_s} tok/s*")  # fmt: skip
        assert line in out
    rc, default, _ = run_main(capsys, "export", "demo")
    assert (rc, default) == (0, out)  # md is the default


# ---------------------------------------------------------------------------------------------
# kvrepl rm


def pool_files(home: Path) -> set[str]:
    return set(os.listdir(KVStore(home / "kv").pool_dir(FP)))


def test_rm_deletes_the_session_and_its_kv_only(tiny, home, capsys):
    """The two sessions share the chunk of the template's opening (the second one's save split
    the first one's chunk there): rm deletes what only the session used, and its list."""
    sid, _ = converse(tiny, home, "demo", "Hello there")
    keep, _ = converse(tiny, home, "keep", "how are you?")
    kv = KVStore(home / "kv")
    demo_files = {p.name for p in kv.session_paths(sid)}
    keep_files = {p.name for p in kv.session_paths(keep)}
    assert demo_files & keep_files and demo_files - keep_files  # shared, and its own
    assert pool_files(home) == demo_files | keep_files
    keep_snapshot = kv.load_session(keep, FP)
    assert keep_snapshot.notes == [] and keep_snapshot.ids
    rc, out, err = run_main(capsys, "rm", "demo")
    assert (rc, out, err) == (0, "deleted demo\n", "")
    assert pool_files(home) == keep_files  # the shared chunk stays; nothing of demo's alone
    assert not (home / "kv" / "sessions" / f"{sid}.json").exists()
    assert kv.session_paths(sid) == [] and kv.n_tokens_on_disk(sid) == 0
    after = KVStore(home / "kv").load_session(keep, FP)
    assert after.notes == [] and after.ids == keep_snapshot.ids
    store = Store(home / "kvrepl.db")
    try:
        assert store.get_session("demo") is None and store.get_session(sid) is None
        assert store.db.execute("SELECT count(*) FROM messages WHERE session_id = ?",
                                [sid]).fetchone()[0] == 0  # fmt: skip
        assert store.get_session("keep") is not None
    finally:
        store.close()
    assert KVStore(home / "kv").n_tokens_on_disk(keep) > 0
    _, listing, _ = run_main(capsys, "sessions")
    assert [line.split("\t")[0] for line in listing.splitlines()] == ["keep"]


def test_rm_leaves_no_file_of_the_session_behind(tiny, home, capsys):
    """Not even its lock file (every `rm` left locks/<id>.lock behind before d0c7344)."""
    sid, _ = converse(tiny, home, "demo", "Hello there")
    assert run_main(capsys, "rm", "demo")[0] == 0
    left = [p for p in home.rglob("*") if sid in p.name]
    assert left == []


def test_rm_refuses_a_session_open_in_another_kvrepl(tiny, home, capsys):
    sid, _ = converse(tiny, home, "demo", "Hello there")
    kv_before = {p: p.read_bytes() for p in (home / "kv").rglob("*") if p.is_file()}
    assert KVStore(home / "kv").session_paths(sid)
    lock = SessionLock(home / "locks", sid)  # as an open kvrepl holds it
    try:
        rc, out, err = run_main(capsys, "rm", "demo")
    finally:
        lock.release()
    assert rc == 1 and out == ""
    assert err == f"kvrepl: this session is open in another kvrepl (pid {os.getpid()}); " \
                  "close it there first\n"  # fmt: skip
    assert {p: p.read_bytes() for p in (home / "kv").rglob("*") if p.is_file()} == kv_before
    assert run_main(capsys, "rm", "demo")[0] == 0  # once it is closed


@pytest.mark.parametrize(
    "argv", [["rm", "x"], ["export", "x"], ["export", "x", "--format", "json"]]
)
def test_unknown_session_is_one_line_and_a_non_zero_exit(tiny, home, tmp_path, argv):
    converse(tiny, home, "demo", "Hello there")  # a store that has other sessions
    p = kvrepl(*argv, cwd=tmp_path, env={"KVREPL_HOME": str(home)})
    assert p.rc != 0
    assert p.out == ""
    assert p.err == "kvrepl: no session 'x'\n"


# ---------------------------------------------------------------------------------------------
# --session NAME


BAD_NAMES = {
    "../../x": "kvrepl: a session name cannot contain '/' (a path separator)",
    "a/b": "kvrepl: a session name cannot contain '/' (a path separator)",
    "..": "kvrepl: '..' cannot be a session name",
    "x" * 300: "kvrepl: a session name has at most 64 characters, not 300",
}


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=["dotdot-x", "a-slash-b", "dotdot", "300"])
def test_bad_session_name_is_one_clear_line_and_creates_nothing_outside(tmp_path, name):
    store = tmp_path / "work" / "store"
    cwd = tmp_path / "work" / "cwd"
    cwd.mkdir(parents=True)
    before = tree(tmp_path, skip=store)
    p = kvrepl("--session", name, cwd=cwd, env={"KVREPL_HOME": str(store)})
    assert p.rc != 0
    assert p.out == ""
    assert p.err == BAD_NAMES[name] + "\n"
    assert tree(tmp_path, skip=store) == before  # nothing outside the store
    if (store / "kvrepl.db").exists():  # and no session inside it
        s = Store(store / "kvrepl.db")
        try:
            assert s.list_sessions() == []
        finally:
            s.close()
    assert not (store / "kv").exists() or list((store / "kv").iterdir()) == []


def test_resume_with_no_session_is_one_line(tmp_path):
    p = kvrepl("--resume", cwd=tmp_path, env={"KVREPL_HOME": str(tmp_path / "s")})
    assert p.rc != 0
    assert p.err == "kvrepl: there is no session to resume yet\n"


# ---------------------------------------------------------------------------------------------
# the log, the device, the session opened


def test_path_log_names_the_log_of_internal_errors(tmp_path):
    env = {"KVREPL_HOME": str(tmp_path / "s")}
    p = kvrepl("path", "--log", cwd=tmp_path, env=env)
    assert (p.rc, p.out, p.err) == (0, f"{tmp_path / 's' / 'kvrepl.log'}\n", "")
    p = kvrepl("path", "--log", "--config", cwd=tmp_path, env=env)
    assert p.rc == 2 and "not allowed with argument" in p.err


@pytest.mark.parametrize("how", ["flag", "variable", "config"])
def test_a_bad_device_is_one_line_with_the_choices_before_any_session_or_model(tmp_path, how):
    store = tmp_path / "store"
    env = {"KVREPL_HOME": str(store), "KVREPL_CONFIG": str(tmp_path / "config.toml")}
    args = ["--session", "new-one", "hello"]
    if how == "flag":
        args = ["--device", "banana", *args]
    elif how == "variable":
        env["KVREPL_DEVICE"] = "banana"
    else:
        (tmp_path / "config.toml").write_text('device = "banana"\n')
    p = kvrepl(*args, cwd=tmp_path, env=env)
    assert (p.rc, p.out) == (2, "")
    assert p.err == "kvrepl: device 'banana': use auto, cpu, cuda or cuda:N (a GPU's number)\n"
    assert not store.exists()  # no session created, no model work


def test_a_new_session_is_said_new_and_an_empty_one_has_no_turns_yet(tmp_path):
    env = {"KVREPL_HOME": str(tmp_path / "s")}
    first = kvrepl("--session", "story", cwd=tmp_path, env=env)
    assert first.rc == 0 and "new session story\n" in first.err and "turn" not in first.err
    again = kvrepl("--session", "story", cwd=tmp_path, env=env)
    assert again.rc == 0 and "session story: no turns yet\n" in again.err


def test_think_also_switches_the_thinking_mode_on_as_think_on_does(home, monkeypatch):
    args = cli.parse(["--think"])
    settings = cli._checked(load_settings(cli.flag_settings(args)), args)
    assert (settings.show_think, settings.thinking) == (True, True)
    plain = cli.parse([])
    assert cli._checked(load_settings(cli.flag_settings(plain)), plain).thinking is None
    monkeypatch.setenv("KVREPL_THINKING", "off")  # said otherwise: only shown
    settings = cli._checked(load_settings(cli.flag_settings(args)), args)
    assert (settings.show_think, settings.thinking) == (True, False)
