"""The conversation store, on real SQLite files in tmp_path."""

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import children
from sqlite_utils import Database

from kvrepl.errors import SessionNameError, StoreError
from kvrepl.store.db import STAT_NAMES, Store
from kvrepl.store.names import validate_session_name
from kvrepl.store.schema import MIGRATIONS, SCHEMA_VERSION, apply_migrations, m001_initial

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "kvrepl.db")
    yield s
    s.close()


def count(store: Store, table: str) -> int:
    return store.db[table].count


# Migrations and opening


@pytest.mark.parametrize("upto", range(1, len(MIGRATIONS) + 1))
def test_each_migration_runs_on_a_blank_memory_db(upto: int) -> None:
    db = Database(memory=True)
    for migration in MIGRATIONS[:upto]:
        migration(db)
    assert {"sessions", "messages", "turns"} <= set(db.table_names())


def test_apply_migrations_on_blank_db_then_nothing_twice() -> None:
    db = Database(memory=True)
    assert apply_migrations(db) == [m.__name__ for m in MIGRATIONS]
    assert apply_migrations(db) == []
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db["_migrations"].count == len(MIGRATIONS)
    assert set(db["turns"].columns_dict) == {"message_id", *STAT_NAMES}


def test_open_creates_parents_wal_and_reopens_without_migrating(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "kvrepl.db"
    first = Store(path, busy_timeout_s=3)
    assert first.applied == [m.__name__ for m in MIGRATIONS]
    assert first.db.journal_mode == "wal"
    assert first.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert first.db.execute("PRAGMA busy_timeout").fetchone()[0] == 3000
    first.create_session("kept")
    first.close()
    again = Store(path)
    assert again.applied == []
    assert again.db["_migrations"].count == len(MIGRATIONS)
    assert again.get_session("kept") is not None
    again.close()


def test_an_old_database_gains_token_ids_and_keeps_its_messages(tmp_path: Path) -> None:
    """A store written before m002 (messages without ids) migrates in place: its answers read
    back with no ids (their text is tokenized), new answers keep theirs."""
    path = tmp_path / "kvrepl.db"
    db = Database(path)
    m001_initial(db)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    db["_migrations"].insert({"name": "m001_initial", "applied_at": "2024-01-01T00:00:00"})
    now = "2024-01-01T00:00:00"
    db["sessions"].insert({"id": "old", "created": now, "updated": now})
    for parent, role, text in ((None, "user", "hi"), (1, "assistant", "hello")):
        row = {"session_id": "old", "parent_id": parent, "role": role, "content": text}
        db["messages"].insert({**row, "created": now})
    db.execute("UPDATE sessions SET head_id = 2")
    db.execute("PRAGMA user_version = 1")
    db.conn.commit()
    db.close()

    store = Store(path)
    assert store.applied == ["m002_message_token_ids"]
    old = store.active_branch("old")
    assert [(m.content, m.token_ids) for m in old] == [("hi", None), ("hello", None)]
    answer = store.finish_answer("old", "again", token_ids=[5, 6, 7], interrupted=True)
    assert store.message(answer.id).token_ids == (5, 6, 7)
    assert store.add_message("old", "user", "more").token_ids is None
    store.close()
    assert Store(path).applied == []


def test_token_ids_round_trip_and_a_hand_edited_row_reads_as_none(store: Store) -> None:
    session = store.create_session()
    store.add_message(session.id, "user", "q")
    empty = store.finish_answer(session.id, "", token_ids=[], interrupted=True)
    assert store.message(empty.id).token_ids == ()
    answer = store.finish_answer(session.id, "a b", token_ids=[1, 2])
    assert store.active_branch(session.id)[-1].token_ids == (1, 2)
    for bad in ("not json", '{"a": 1}', "[1, 2.5]", '["1"]'):
        store.db.execute("UPDATE messages SET token_ids = ? WHERE id = ?", [bad, answer.id])
        assert store.message(answer.id).token_ids is None


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "kvrepl.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    message = f"newer kvrepl \\(schema {SCHEMA_VERSION + 1}; this one knows {SCHEMA_VERSION}\\)"
    with pytest.raises(StoreError, match=message):
        Store(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"just some text\n" * 300, os.urandom(8192)])
def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path, content: bytes):
    path = tmp_path / "kvrepl.db"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="is not a kvrepl database: file is not a database"):
        Store(path)
    assert path.read_bytes() == content


@pytest.mark.parametrize("user_version", [0, 1])
def test_another_programs_database_is_refused_untouched(tmp_path: Path, user_version: int):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE logs (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute(f"PRAGMA user_version = {user_version}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="is not a kvrepl database"):
        Store(path)
    assert path.read_bytes() == before


# The message tree


def converse(store: Store, session_id: str, *lines: str) -> list:
    """Alternate user and assistant messages down from the head."""
    roles = ("user", "assistant")
    return [store.add_message(session_id, roles[i % 2], line) for i, line in enumerate(lines)]


def test_an_edit_branches_and_keeps_the_old_branch(store: Store) -> None:
    sid = store.create_session("chat").id
    q1, a1, q2, a2 = converse(store, sid, "q1", "a1", "q2", "a2")
    edited = store.add_message(sid, "user", "q2 again", parent_id=q2.parent_id)
    a2b = store.add_message(sid, "assistant", "a2 again")

    assert [m.id for m in store.active_branch(sid)] == [q1.id, a1.id, edited.id, a2b.id]
    assert children(store, a1.id) == [q2.id, edited.id]
    assert count(store, "messages") == 6

    old, new = store.branches(sid)
    assert (old.leaf.id, old.length, old.shared, old.fork_id) == (a2.id, 4, 2, a1.id)
    assert old.diverges == q2 and not old.active
    assert (new.leaf.id, new.shared, new.diverges, new.active) == (a2b.id, 4, None, True)

    store.set_head(sid, old.leaf.id)
    assert [m.content for m in store.active_branch(sid)] == ["q1", "a1", "q2", "a2"]
    assert [b.active for b in store.branches(sid)] == [True, False]


def test_editing_the_first_message_makes_a_new_root(store: Store) -> None:
    sid = store.create_session().id
    converse(store, sid, "q1", "a1")
    root = store.add_message(sid, "user", "q1 edited", parent_id=None)
    assert store.active_branch(sid) == [root]
    old, new = store.branches(sid)
    assert (old.shared, old.fork_id, old.diverges.content) == (0, None, "q1")
    assert new.active


def test_set_head_refuses_a_message_of_another_session(store: Store) -> None:
    a, b = store.create_session().id, store.create_session().id
    (m,) = converse(store, a, "hello")
    with pytest.raises(StoreError, match="not in session"):
        store.set_head(b, m.id)
    with pytest.raises(StoreError, match="not in session"):
        store.add_message(b, "user", "x", parent_id=m.id)


def test_unknown_role_and_session_are_refused(store: Store) -> None:
    sid = store.create_session().id
    with pytest.raises(StoreError, match="unknown role"):
        store.add_message(sid, "tool", "x")
    with pytest.raises(StoreError, match="no session"):
        store.add_message("nope", "user", "x")
    assert count(store, "messages") == 0


def test_title_comes_from_the_first_user_message(store: Store) -> None:
    sid = store.create_session().id
    store.add_message(sid, "system", "You are terse.")
    store.add_message(sid, "user", "first   line\nsecond line " + "x" * 100)
    store.add_message(sid, "user", "later")
    title = store.get_session(sid).title
    assert title.startswith("first line second line") and "\n" not in title
    assert len(title) <= 60


# Turns and stats


def test_finish_answer_stores_message_and_stats(store: Store) -> None:
    sid = store.create_session().id
    converse(store, sid, "q1")
    stats = dict(reused_tokens=0, prefilled_tokens=10, generated_tokens=20, ttft_s=0.5)
    answer = store.finish_answer(sid, "a1", think="hmm", stats=stats | {"decode_tok_s": 10.0})
    converse(store, sid, "q2")
    store.finish_answer(sid, "a2", interrupted=True, stats=stats | {"decode_tok_s": 40.0})
    (first, first_stats), (second, _) = store.turn_stats(sid)
    assert first == answer and first.think == "hmm" and first_stats["prefilled_tokens"] == 10
    assert second.interrupted
    totals = store.session_totals(sid)
    assert (totals["answers"], totals["generated_tokens"], totals["ttft_s"]) == (2, 40, 0.5)
    assert totals["decode_tok_s"] == pytest.approx(40 / (2 + 0.5))


def test_turns_and_tokens_are_the_active_branchs_and_its_last_answers(store: Store) -> None:
    """turns: the user messages of the active branch (not every answer ever computed); tokens:
    the conversation at its last answer that got past its prompt (prompt and answer)."""

    def figures(reused: int, prefilled: int, generated: int) -> dict[str, int]:
        return dict(reused_tokens=reused, prefilled_tokens=prefilled, generated_tokens=generated)

    sid = store.create_session().id
    assert (store.summary(sid).turns, store.summary(sid).tokens) == (0, 0)
    converse(store, sid, "q1")
    store.finish_answer(sid, "a1", stats=figures(0, 30, 10))
    q2 = converse(store, sid, "q2")[0]
    store.finish_answer(sid, "a2", stats=figures(40, 12, 10))
    assert (store.summary(sid).turns, store.summary(sid).tokens) == (2, 62)
    store.finish_answer(sid, "a2 again", parent_id=q2.id, stats=figures(51, 1, 4))
    assert store.session_totals(sid)["answers"] == 3  # every answer computed, both branches
    assert (store.summary(sid).turns, store.summary(sid).tokens) == (2, 56)
    # an answer stopped in its prompt holds only what was prefilled: the last whole one counts
    q3 = converse(store, sid, "q3")[0]
    store.finish_answer(sid, "", interrupted=True, stats=figures(56, 3, 0))
    assert (store.summary(sid).turns, store.summary(sid).tokens) == (3, 56)
    # an interrupted answer that generated counts: its prompt was whole
    store.finish_answer(sid, "pa", interrupted=True, parent_id=q3.id, stats=figures(58, 7, 2))
    assert store.summary(sid).tokens == 67
    store.set_head(sid, q2.parent_id)  # back to turn 1's answer (as /undo leaves it)
    assert (store.summary(sid).turns, store.summary(sid).tokens) == (1, 40)
    assert [s.tokens for s in store.list_sessions()] == [40]
    with pytest.raises(StoreError, match="no session"):
        store.summary("nope")


def test_finish_answer_is_all_or_nothing(store: Store) -> None:
    sid = store.create_session().id
    (q,) = converse(store, sid, "q1")
    before = store.get_session(sid)
    with pytest.raises(StoreError):
        store.finish_answer(sid, "a1", stats={"ttft_s": object()})  # fails after the message
    with pytest.raises(StoreError, match="unknown turn stats: bogus"):
        store.finish_answer(sid, "a1", stats={"bogus": 1})
    assert count(store, "messages") == 1 and count(store, "turns") == 0
    assert store.get_session(sid) == before
    assert store.active_branch(sid) == [q]


# Sessions


def test_list_latest_rename_settings(store: Store) -> None:
    a = store.create_session("a", model="m1", settings={"temperature": 0.7})
    b = store.create_session()
    converse(store, b.id, "q1", "a1", "q2")
    store.add_message(b.id, "user", "q2 edited", parent_id=store.active_branch(b.id)[1].id)
    summaries = store.list_sessions()
    assert [(s.id, s.turns) for s in summaries] == [(b.id, 2), (a.id, 0)]
    assert store.latest_session().id == b.id

    with pytest.raises(StoreError, match="'a' already exists"):
        store.rename_session(b.id, "a")
    with pytest.raises(SessionNameError):
        store.rename_session(b.id, "../b")
    with pytest.raises(StoreError, match="already exists"):
        store.create_session("a")
    store.rename_session(b.id, "b")
    assert store.get_session("b").id == b.id == store.get_session(b.id).id
    assert store.get_session("missing") is None

    merged = store.update_settings(a.id, {"top_p": 0.9, "temperature": None})
    assert merged == {"top_p": 0.9} == store.get_session("a").settings


def test_delete_session_removes_its_messages_and_turns_only(store: Store) -> None:
    gone, kept = store.create_session().id, store.create_session().id
    for sid in (gone, kept):
        converse(store, sid, "q")
        store.finish_answer(sid, "a", stats={"generated_tokens": 1})
    store.delete_session(gone)
    assert store.get_session(gone) is None
    assert count(store, "messages") == 2 and count(store, "turns") == 1
    assert len(store.active_branch(kept)) == 2
    with pytest.raises(StoreError, match="no session"):
        store.delete_session(gone)


# Text and names


def test_surrogates_are_replaced_and_special_tokens_kept(store: Store) -> None:
    sid = store.create_session().id
    m = store.add_message(sid, "user", "\ud800x <|im_end|>\ud83d\ude00", think="\udcff")
    assert (m.content, m.think) == ("\ufffdx <|im_end|>\U0001f600", "\ufffd")
    store.finish_answer(sid, "\udc80ok")
    assert store.active_branch(sid)[-1].content == "\ufffdok"


BAD_NAMES = [
    "../../x", "/etc/passwd", "a/b", "a\\b", ".", "..", "", "   ", " a", "a ", "a\x00b",
    "a\tb", "a\u200bb", "x" * 300, "x" * 65, "a\u2215b", "a\u2044b", "a\uff0fb", "a\u29f8b",
    "-rf", ".hidden", "a*b", "a:b", "\ud800",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_session_names_are_refused(name: str) -> None:
    with pytest.raises(SessionNameError) as info:
        validate_session_name(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["work", "my chat", "v1.2", "a-b_c", "Größe", "日本語", "x" * 64])
def test_good_session_names_are_accepted(name: str) -> None:
    assert validate_session_name(name) == name


# Two processes


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kvrepl.store.db import Store
    path, sid, tag = sys.argv[1:]
    store = Store(Path(path))
    Path(path + "." + tag).touch()
    while not Path(path + ".go").exists():
        time.sleep(0.001)
    for i in range(50):
        store.add_message(sid, "user", f"{tag}{i}")
    """
)


def test_two_processes_write_the_same_db(tmp_path: Path) -> None:
    path = tmp_path / "kvrepl.db"
    setup = Store(path)
    sid = setup.create_session().id
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), sid, tag],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{path}.{tag}").exists() for tag in "ab"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.005)
    Path(f"{path}.go").touch()  # both opened: start writing together
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "locked" not in err
    branch = setup.active_branch(sid)
    assert sorted(m.content for m in branch) == sorted(f"{t}{i}" for t in "ab" for i in range(50))
    # Every write read the head inside its own transaction, so the 100 form one chain.
    assert len(branch) == count(setup, "messages") == 100
    setup.close()


def test_a_held_write_lock_gives_a_clear_busy_error(tmp_path: Path) -> None:
    path = tmp_path / "kvrepl.db"
    store = Store(path, busy_timeout_s=0.2)
    sid = store.create_session().id
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(
            StoreError, match=r"busy \(another kvrepl is writing\): gave up after 0.2 s"
        ):
            store.add_message(sid, "user", "x")
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.add_message(sid, "user", "x")
    store.close()
