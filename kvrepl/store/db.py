"""The conversation store: sessions, their messages as a tree, and per-turn stats, in SQLite
through sqlite-utils.

Owns what the rows mean: sessions (names checked by names.py, kept unique here), the message tree
(an edit adds a sibling and moves the session's head; nothing is deleted except a whole session),
the ids an answer was generated as, turn stats, and turning rows into the records it hands out
(records.py). The file itself
(schema, migrations, refusing a foreign or newer file, one `BEGIN IMMEDIATE` transaction per
write) is schema.py's; a `Store` opens its file through it, migrated on construction.

Never touches tensors, KV snapshots or the model: the messages here are the truth, and caches
built from them live elsewhere (kvstore.py, engine.py).
"""

from __future__ import annotations

import json
import secrets
from contextlib import AbstractContextManager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrepl.errors import StoreError
from kvrepl.store.names import validate_session_name
from kvrepl.store.records import Branch, Message, Session, SessionSummary, clean_text
from kvrepl.store.schema import open_database, timestamp, write

if TYPE_CHECKING:
    from sqlite_utils import Database

ROLES = ("system", "user", "assistant")
STAT_NAMES = ("reused_tokens", "prefilled_tokens", "generated_tokens", "ttft_s", "decode_tok_s")
TITLE_MAX = 60


class _Head(Enum):
    HEAD = "head"


HEAD = _Head.HEAD  # add_message's default parent: the session's current head


# Root→head of one session's active branch, as (id, depth from the head).
_BRANCH_CTE = """
WITH RECURSIVE branch(id, depth) AS (
    SELECT head_id, 0 FROM sessions WHERE id = :sid AND head_id IS NOT NULL
    UNION ALL
    SELECT m.parent_id, b.depth + 1 FROM messages m JOIN branch b ON m.id = b.id
    WHERE m.parent_id IS NOT NULL
)
"""


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_MAX else line[: TITLE_MAX - 1].rstrip() + "…"


def _message(row: dict[str, Any]) -> Message:
    fields = {name: row[name] for name in Message.__dataclass_fields__}
    fields |= {"interrupted": bool(row["interrupted"]), "token_ids": _token_ids(row["token_ids"])}
    return Message(**fields)


def _token_ids(text: str | None) -> tuple[int, ...] | None:
    """A stored id list; anything else (a row edited by hand) is None: the text is the truth."""
    try:
        ids = json.loads(text or "null")
    except ValueError:
        return None
    return tuple(ids) if isinstance(ids, list) and all(type(i) is int for i in ids) else None


def _session(row: dict[str, Any]) -> Session:
    return Session(**{**row, "settings": json.loads(row["settings"])})


class Store:
    """The conversation store on one SQLite file (or `":memory:"`), migrated on construction."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        self.busy_timeout_s = busy_timeout_s
        self.path = Path(path)
        self.db, self.applied = open_database(path, busy_timeout_s)

    def close(self) -> None:
        self.db.close()

    def _write(self) -> AbstractContextManager[Database]:
        """One write transaction, `BEGIN IMMEDIATE` (schema.write says why)."""
        return write(self.db, self.busy_timeout_s)

    def _one(self, sql: str, params: dict[str, Any] | list[Any]) -> dict[str, Any] | None:
        return next(self.db.query(sql, params), None)

    def _session_row(self, session_id: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM sessions WHERE id = ?", [session_id])
        if row is None:
            raise StoreError(f"no session {session_id!r}")
        return row

    def _check_member(self, session_id: str, message_id: int) -> None:
        row = self._one("SELECT session_id FROM messages WHERE id = ?", [message_id])
        if row is None or row["session_id"] != session_id:
            raise StoreError(f"message {message_id} is not in session {session_id!r}")

    def _check_name_free(self, name: str, session_id: str | None = None) -> None:
        row = self._one("SELECT id FROM sessions WHERE name = ?", [name])
        if row is not None and row["id"] != session_id:
            raise StoreError(f"a session named {name!r} already exists")

    # Sessions

    def create_session(
        self, name: str | None = None, model: str = "", settings: dict[str, Any] | None = None
    ) -> Session:
        if name is not None:
            validate_session_name(name)
        now = timestamp()
        with self._write() as db:
            if name is not None:
                self._check_name_free(name)
            session_id = secrets.token_hex(4)
            while self._one("SELECT 1 FROM sessions WHERE id = ?", [session_id]):
                session_id = secrets.token_hex(4)
            row = {"id": session_id, "name": name, "title": "", "model": clean_text(model)}
            row |= {"created": now, "updated": now, "settings": json.dumps(settings or {})}
            db["sessions"].insert(row)
        return _session(self._session_row(session_id))

    def get_session(self, name_or_id: str) -> Session | None:
        """The session with this name or, failing that, this id."""
        for column in ("name", "id"):
            row = self._one(f"SELECT * FROM sessions WHERE {column} = ?", [name_or_id])
            if row is not None:
                return _session(row)
        return None

    def latest_session(self) -> Session | None:
        row = self._one("SELECT * FROM sessions ORDER BY updated DESC, rowid DESC LIMIT 1", [])
        return None if row is None else _session(row)

    def list_sessions(self) -> list[SessionSummary]:
        """Every session, most recently updated first."""
        return self._summaries()

    def summary(self, session_id: str) -> SessionSummary:
        """One session as `list_sessions` lists it."""
        found = self._summaries(session_id)
        if not found:
            raise StoreError(f"no session {session_id!r}")
        return found[0]

    def _summaries(self, session_id: str | None = None) -> list[SessionSummary]:
        sql = """
        WITH RECURSIVE branch(session_id, id, depth) AS (
            SELECT id, head_id, 0 FROM sessions
            WHERE head_id IS NOT NULL AND (:sid IS NULL OR id = :sid)
            UNION ALL
            SELECT b.session_id, m.parent_id, b.depth + 1 FROM messages m JOIN branch b
            ON m.id = b.id WHERE m.parent_id IS NOT NULL
        )
        SELECT s.*, (
            SELECT count(*) FROM branch b JOIN messages m ON m.id = b.id
            WHERE b.session_id = s.id AND m.role = 'user'
        ) AS turns, coalesce((
            SELECT coalesce(t.reused_tokens, 0) + coalesce(t.prefilled_tokens, 0)
                + coalesce(t.generated_tokens, 0)
            FROM branch b JOIN messages m ON m.id = b.id JOIN turns t ON t.message_id = m.id
            WHERE b.session_id = s.id AND (m.interrupted = 0 OR t.generated_tokens > 0)
            ORDER BY b.depth LIMIT 1
        ), 0) AS tokens
        FROM sessions s WHERE :sid IS NULL OR s.id = :sid ORDER BY s.updated DESC, s.rowid DESC
        """
        fields = SessionSummary.__dataclass_fields__
        rows = self.db.query(sql, {"sid": session_id})
        return [SessionSummary(**{k: r[k] for k in fields}) for r in rows]

    def rename_session(self, session_id: str, name: str | None) -> None:
        """Give the session a (unique) name; None removes it."""
        if name is not None:
            validate_session_name(name)
        with self._write() as db:
            self._session_row(session_id)
            if name is not None:
                self._check_name_free(name, session_id)
            db["sessions"].update(session_id, {"name": name, "updated": timestamp()})

    def update_settings(self, session_id: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Merge `settings` into the session's (a None value removes the key); return the result."""
        with self._write() as db:
            merged = json.loads(self._session_row(session_id)["settings"])
            merged.update(settings)
            merged = {k: v for k, v in merged.items() if v is not None}
            db["sessions"].update(session_id, {"settings": json.dumps(merged)})
        return merged

    def delete_session(self, session_id: str) -> None:
        """Delete the session with all its messages and turn stats."""
        with self._write() as db:
            if db.execute("DELETE FROM sessions WHERE id = ?", [session_id]).rowcount == 0:
                raise StoreError(f"no session {session_id!r}")

    # Messages

    def _insert(self, session_id: str, role: str, content: str, parent_id: int | None | _Head,
                think: str | None, interrupted: bool,
                token_ids: list[int] | None) -> int:  # fmt: skip
        """Insert a message and make it the head. Call inside a write transaction."""
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        session = self._session_row(session_id)
        parent = session["head_id"] if parent_id is HEAD else parent_id
        if parent is not None:
            self._check_member(session_id, parent)
        now = timestamp()
        row = {
            "session_id": session_id,
            "parent_id": parent,
            "role": role,
            "content": clean_text(content),
            "think": None if think is None else clean_text(think),
            "created": now,
            "interrupted": int(interrupted),
            "token_ids": None if token_ids is None else json.dumps([int(i) for i in token_ids]),
        }
        message_id = self.db["messages"].insert(row).last_pk
        updates: dict[str, Any] = {"head_id": message_id, "updated": now}
        if role == "user" and not session["title"]:
            updates["title"] = _title(row["content"])
        self.db["sessions"].update(session_id, updates)
        return message_id

    def add_message(
        self,
        session_id: str,
        role: str,
        content: str,
        *,
        parent_id: int | None | _Head = HEAD,
        think: str | None = None,
        interrupted: bool = False,
        token_ids: list[int] | None = None,
    ) -> Message:
        """Add a message under `parent_id` (default: the head; None: a new root), make it the
        head. An edit is a new message under the edited one's parent: a new branch."""
        with self._write():
            message_id = self._insert(session_id, role, content, parent_id, think, interrupted,
                                      token_ids)  # fmt: skip
        return self.message(message_id)

    def finish_answer(
        self,
        session_id: str,
        content: str,
        *,
        think: str | None = None,
        interrupted: bool = False,
        stats: dict[str, Any] | None = None,
        role: str = "assistant",
        parent_id: int | None | _Head = HEAD,
        token_ids: list[int] | None = None,
    ) -> Message:
        """Store an answer, the ids it was generated as, and its turn stats: all or nothing."""
        stats = stats or {}
        unknown = sorted(set(stats) - set(STAT_NAMES))
        if unknown:
            raise StoreError(f"unknown turn stats: {', '.join(unknown)}")
        with self._write() as db:
            message_id = self._insert(session_id, role, content, parent_id, think, interrupted,
                                      token_ids)  # fmt: skip
            db["turns"].insert({"message_id": message_id, **{k: stats.get(k) for k in STAT_NAMES}})
        return self.message(message_id)

    def message(self, message_id: int) -> Message:
        row = self._one("SELECT * FROM messages WHERE id = ?", [message_id])
        if row is None:
            raise StoreError(f"no message {message_id}")
        return _message(row)

    def active_branch(self, session_id: str) -> list[Message]:
        """The messages from the root to the session's head."""
        self._session_row(session_id)
        sql = _BRANCH_CTE + "SELECT m.* FROM branch b JOIN messages m ON m.id = b.id "
        sql += "ORDER BY b.depth DESC"
        return [_message(row) for row in self.db.query(sql, {"sid": session_id})]

    def set_head(self, session_id: str, message_id: int | None) -> None:
        """Make `message_id` (a message of this session; None: empty) the head: switch branch."""
        with self._write() as db:
            self._session_row(session_id)
            if message_id is not None:
                self._check_member(session_id, message_id)
            db["sessions"].update(session_id, {"head_id": message_id, "updated": timestamp()})

    def branches(self, session_id: str) -> list[Branch]:
        """Every leaf of the session's tree, oldest first, with where it leaves the active branch.
        Switching to a branch is `set_head(session_id, branch.leaf.id)`."""
        active = [m.id for m in self.active_branch(session_id)]
        sql = "SELECT * FROM messages WHERE session_id = ? ORDER BY id"
        messages = {row["id"]: _message(row) for row in self.db.query(sql, [session_id])}
        parents = {m.parent_id for m in messages.values()}
        head = active[-1] if active else None
        result = []
        for leaf in (m for m in messages.values() if m.id not in parents):
            path = [leaf]
            while path[-1].parent_id is not None:
                path.append(messages[path[-1].parent_id])
            path.reverse()
            shared = 0
            while shared < min(len(path), len(active)) and path[shared].id == active[shared]:
                shared += 1
            fork_id = path[shared - 1].id if shared else None
            diverges = path[shared] if shared < len(path) else None
            result.append(Branch(leaf, len(path), shared, fork_id, diverges, leaf.id == head))
        return result

    # Stats

    def turn_stats(self, session_id: str) -> list[tuple[Message, dict[str, Any]]]:
        """The answers on the active branch that have turn stats, root first."""
        self._session_row(session_id)
        columns = ", ".join(f"t.{name} AS stat_{name}" for name in STAT_NAMES)
        sql = _BRANCH_CTE + f"SELECT m.*, {columns} FROM branch b JOIN messages m ON m.id = b.id "
        sql += "JOIN turns t ON t.message_id = m.id ORDER BY b.depth DESC"
        return [
            (_message(row), {name: row[f"stat_{name}"] for name in STAT_NAMES})
            for row in self.db.query(sql, {"sid": session_id})
        ]

    def session_totals(self, session_id: str) -> dict[str, Any]:
        """Totals over every answer the session ever computed, all branches (`answers`; its
        `turns` are the user messages of the active branch, `summary`'s): token sums, mean time
        to first token, and decode speed as all generated tokens over all decode time."""
        self._session_row(session_id)
        sql = """
        SELECT count(*) AS answers,
            coalesce(sum(t.reused_tokens), 0) AS reused_tokens,
            coalesce(sum(t.prefilled_tokens), 0) AS prefilled_tokens,
            coalesce(sum(t.generated_tokens), 0) AS generated_tokens,
            avg(t.ttft_s) AS ttft_s,
            sum(CASE WHEN t.decode_tok_s > 0 THEN t.generated_tokens END)
                / sum(CASE WHEN t.decode_tok_s > 0 THEN t.generated_tokens * 1.0 / t.decode_tok_s
                      END) AS decode_tok_s
        FROM turns t JOIN messages m ON m.id = t.message_id WHERE m.session_id = ?
        """
        return next(self.db.query(sql, [session_id]))  # an aggregate: always one row
