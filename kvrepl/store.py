"""The conversation store: sessions, their messages as a tree, and per-turn stats, in SQLite
through sqlite-utils.

Owns the database file: its schema (small named migrations, applied when a `Store` is built),
the message tree (an edit adds a sibling and moves the session's head; nothing is deleted except
a whole session), and the write discipline (every write is one `BEGIN IMMEDIATE` transaction, so
two kvrepl processes on one file wait for each other instead of failing).

Never touches tensors, KV snapshots or the model: the messages here are the truth, and caches
built from them live elsewhere (kvstore.py, engine.py).
"""

import json
import secrets
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from kvrepl.errors import SessionNameError, StoreError

ROLES = ("system", "user", "assistant")
STAT_NAMES = ("reused_tokens", "prefilled_tokens", "generated_tokens", "ttft_s", "decode_tok_s")
NAME_MAX = 64
TITLE_MAX = 60
# Real separators and the lookalikes that would read as one in a listing or a file name.
_SLASHES = "/\\\u2215\u2044\uff0f\u29f8"


def validate_session_name(name: str) -> str:
    """Return `name` if it is a usable session name, else raise SessionNameError saying why."""
    if not name or not name.strip():
        raise SessionNameError("a session name cannot be empty")
    if name != name.strip():
        raise SessionNameError("a session name cannot start or end with whitespace")
    if name in (".", ".."):
        raise SessionNameError(f"{name!r} cannot be a session name")
    if len(name) > NAME_MAX:
        raise SessionNameError(f"a session name has at most {NAME_MAX} characters, not {len(name)}")
    for ch in name:
        if ch in _SLASHES:
            raise SessionNameError(f"a session name cannot contain {ch!r} (a path separator)")
        if unicodedata.category(ch) in ("Cc", "Cf"):
            raise SessionNameError(
                f"a session name cannot contain control characters (U+{ord(ch):04X})"
            )
    if name[0] in "-.":
        raise SessionNameError(f"a session name cannot start with {name[0]!r}")
    for ch in name:
        if unicodedata.category(ch)[0] not in "LNM" and ch not in " -_.":
            raise SessionNameError(
                f"a session name holds letters, digits, spaces, '-', '_' and '.', not {ch!r}"
            )
    return name


@dataclass(frozen=True)
class Session:
    id: str
    name: str | None
    title: str
    model: str
    created: str
    updated: str
    head_id: int | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class Message:
    id: int
    session_id: str
    parent_id: int | None
    role: str
    content: str
    think: str | None
    created: str
    interrupted: bool


@dataclass(frozen=True)
class SessionSummary:
    id: str
    name: str | None
    title: str
    model: str
    turns: int  # user messages on the active branch
    created: str
    updated: str


@dataclass(frozen=True)
class Branch:
    """One leaf of a session's tree, seen from the active branch."""

    leaf: Message
    length: int  # messages from the root to the leaf
    shared: int  # leading messages in common with the active branch
    fork_id: int | None  # last message shared with the active branch (None: different root)
    diverges: Message | None  # first message not on the active branch (None: on it)
    active: bool  # the leaf is the session's head


class _Head(Enum):
    HEAD = "head"


HEAD = _Head.HEAD  # add_message's default parent: the session's current head


def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            name TEXT UNIQUE,
            title TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            head_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            settings TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            think TEXT,
            created TEXT NOT NULL,
            interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1))
        );
        CREATE INDEX messages_session_parent ON messages(session_id, parent_id);
        CREATE INDEX sessions_updated ON sessions(updated);
        CREATE TABLE turns (
            message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
            reused_tokens INTEGER, prefilled_tokens INTEGER, generated_tokens INTEGER,
            ttft_s REAL, decode_tok_s REAL
        );
        """
    )


MIGRATIONS: list[Callable[[Database], None]] = [m001_initial]
SCHEMA_VERSION = len(MIGRATIONS)

# Root→head of one session's active branch, as (id, depth from the head).
_BRANCH_CTE = """
WITH RECURSIVE branch(id, depth) AS (
    SELECT head_id, 0 FROM sessions WHERE id = :sid AND head_id IS NOT NULL
    UNION ALL
    SELECT m.parent_id, b.depth + 1 FROM messages m JOIN branch b ON m.id = b.id
    WHERE m.parent_id IS NOT NULL
)
"""


def apply_migrations(db: Database) -> list[str]:
    """Apply the migrations `db` lacks, in order; return their names. Call inside a transaction."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    done = {row["name"] for row in db.query("SELECT name FROM _migrations")}
    applied = []
    for migration in MIGRATIONS:
        if migration.__name__ not in done:
            migration(db)
            db["_migrations"].insert({"name": migration.__name__, "applied_at": _now()})
            applied.append(migration.__name__)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return applied


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def clean_text(text: str) -> str:
    """Replace lone surrogates (which SQLite cannot encode) with U+FFFD; keep valid pairs."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_MAX else line[: TITLE_MAX - 1].rstrip() + "…"


def _is_busy(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(error)


def _message(row: dict[str, Any]) -> Message:
    fields = {name: row[name] for name in Message.__dataclass_fields__}
    return Message(**{**fields, "interrupted": bool(row["interrupted"])})


def _session(row: dict[str, Any]) -> Session:
    return Session(**{**row, "settings": json.loads(row["settings"])})


class Store:
    """The conversation store on one SQLite file (or `":memory:"`), migrated on construction."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        self.busy_timeout_s = busy_timeout_s
        memory = str(path) == ":memory:"
        self.path = Path(path)
        try:
            if not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=busy_timeout_s)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the store at {path}: {e}") from e
        try:
            version, tables = self._inspect(conn)
            conn.execute("PRAGMA foreign_keys = ON")
            if not memory:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL's usual pairing
            self.db = Database(conn, execute_plugins=False)
            self.applied: list[str] = []
            if version != SCHEMA_VERSION or "_migrations" not in tables:
                with self._write() as db:
                    self._inspect(conn)  # another process may have migrated meanwhile
                    self.applied = apply_migrations(db)
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e) from e
        except BaseException:
            conn.close()
            raise

    @classmethod
    def memory(cls) -> "Store":
        return cls(":memory:")

    def close(self) -> None:
        self.db.close()

    def _inspect(self, conn: sqlite3.Connection) -> tuple[int, set[str]]:
        """Refuse a file that is not ours, or is newer, before anything is written to it."""
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        except sqlite3.DatabaseError as e:
            if _is_busy(e):
                raise
            raise StoreError(f"{self.path} is not a kvrepl database: {e}") from e
        tables = {row[0] for row in rows}
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"this database was written by a newer kvrepl (schema {version}; "
                f"this one knows {SCHEMA_VERSION}); not touching it"
            )
        if "_migrations" not in tables and (tables or version != 0):
            raise StoreError(
                f"{self.path} is not a kvrepl database: it holds other tables "
                f"(user_version {version}); not touching it"
            )
        return version, tables

    def _error(self, error: sqlite3.Error) -> StoreError:
        if _is_busy(error):
            return StoreError(
                "the store is busy (another kvrepl is writing): "
                f"gave up after {self.busy_timeout_s:g} s"
            )
        return StoreError(f"the store failed: {error}")

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction. sqlite-utils' atomic() issues a deferred BEGIN, whose later
        read-to-write upgrade fails at once (no busy wait) when another process wrote in between;
        BEGIN IMMEDIATE takes the write lock up front, where the busy timeout does apply."""
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            yield self.db
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from e
            raise

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
        now = _now()
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
        sql = """
        WITH RECURSIVE branch(session_id, id) AS (
            SELECT id, head_id FROM sessions WHERE head_id IS NOT NULL
            UNION ALL
            SELECT b.session_id, m.parent_id FROM messages m JOIN branch b ON m.id = b.id
            WHERE m.parent_id IS NOT NULL
        )
        SELECT s.*, (
            SELECT count(*) FROM branch b JOIN messages m ON m.id = b.id
            WHERE b.session_id = s.id AND m.role = 'user'
        ) AS turns
        FROM sessions s ORDER BY s.updated DESC, s.rowid DESC
        """
        fields = SessionSummary.__dataclass_fields__
        return [SessionSummary(**{k: r[k] for k in fields}) for r in self.db.query(sql)]

    def rename_session(self, session_id: str, name: str | None) -> None:
        """Give the session a (unique) name; None removes it."""
        if name is not None:
            validate_session_name(name)
        with self._write() as db:
            self._session_row(session_id)
            if name is not None:
                self._check_name_free(name, session_id)
            db["sessions"].update(session_id, {"name": name, "updated": _now()})

    def set_title(self, session_id: str, title: str) -> None:
        with self._write() as db:
            self._session_row(session_id)
            db["sessions"].update(session_id, {"title": _title(clean_text(title))})

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

    def _insert(
        self,
        session_id: str,
        role: str,
        content: str,
        parent_id: int | None | _Head,
        think: str | None,
        interrupted: bool,
    ) -> int:
        """Insert a message and make it the head. Call inside a write transaction."""
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        session = self._session_row(session_id)
        parent = session["head_id"] if parent_id is HEAD else parent_id
        if parent is not None:
            self._check_member(session_id, parent)
        now = _now()
        row = {
            "session_id": session_id,
            "parent_id": parent,
            "role": role,
            "content": clean_text(content),
            "think": None if think is None else clean_text(think),
            "created": now,
            "interrupted": int(interrupted),
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
    ) -> Message:
        """Add a message under `parent_id` (default: the head; None: a new root), make it the
        head. An edit is a new message under the edited one's parent: a new branch."""
        with self._write():
            message_id = self._insert(session_id, role, content, parent_id, think, interrupted)
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
    ) -> Message:
        """Store an answer and its turn stats together: both or neither."""
        stats = stats or {}
        unknown = sorted(set(stats) - set(STAT_NAMES))
        if unknown:
            raise StoreError(f"unknown turn stats: {', '.join(unknown)}")
        with self._write() as db:
            message_id = self._insert(session_id, role, content, parent_id, think, interrupted)
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
            db["sessions"].update(session_id, {"head_id": message_id, "updated": _now()})

    def children(self, message_id: int) -> list[Message]:
        sql = "SELECT * FROM messages WHERE parent_id = ? ORDER BY id"
        return [_message(row) for row in self.db.query(sql, [message_id])]

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
        """Totals over every turn the session ever ran, all branches: token sums, mean time to
        first token, and decode speed as all generated tokens over all decode time."""
        self._session_row(session_id)
        sql = """
        SELECT count(*) AS turns,
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
