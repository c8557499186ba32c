"""The store's SQLite file: its schema, and the rules for opening and writing it.

Owns: the tables, as a list of small named migrations (each applied once, in order, recorded in
`_migrations`; `PRAGMA user_version` is their count); the refusal of a file that is not a kvrepl
database or was written by a newer kvrepl, before anything is written to it; opening a file with
its pragmas (foreign keys; WAL on disk); the write discipline (every write is one `BEGIN
IMMEDIATE` transaction, so two kvrepl processes on one file wait for each other instead of
failing); sqlite errors turned into StoreError; and the timestamp format of every time column.

Never reads or writes sessions, messages or stats, and knows nothing of what a row means:
that is db.py.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kvrepl.errors import StoreError

if TYPE_CHECKING:
    from sqlite_utils import Database


def timestamp() -> str:
    """Now, as every time column holds it: UTC, ISO 8601, microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


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


def m002_message_token_ids(db: Database) -> None:
    """The ids an answer was generated as (a JSON list), so the next turn renders exactly them;
    NULL for older messages, which fall back to tokenizing their text."""
    db.execute("ALTER TABLE messages ADD COLUMN token_ids TEXT")


MIGRATIONS: list[Callable[[Database], None]] = [m001_initial, m002_message_token_ids]
SCHEMA_VERSION = len(MIGRATIONS)


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
            db["_migrations"].insert({"name": migration.__name__, "applied_at": timestamp()})
            applied.append(migration.__name__)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return applied


def _is_busy(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(error)


def store_error(error: sqlite3.Error, busy_timeout_s: float) -> StoreError:
    """The one-line StoreError for a sqlite error: a busy file says how long it waited."""
    if _is_busy(error):
        return StoreError(
            f"the store is busy (another kvrepl is writing): gave up after {busy_timeout_s:g} s"
        )
    return StoreError(f"the store failed: {error}")


def inspect_file(conn: sqlite3.Connection, path: Path) -> tuple[int, set[str]]:
    """Refuse a file that is not ours, or is newer, before anything is written to it."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError as e:
        if _is_busy(e):
            raise
        raise StoreError(f"{path} is not a kvrepl database: {e}") from e
    tables = {row[0] for row in rows}
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"this database was written by a newer kvrepl (schema {version}; "
            f"this one knows {SCHEMA_VERSION}); not touching it"
        )
    if "_migrations" not in tables and (tables or version != 0):
        raise StoreError(
            f"{path} is not a kvrepl database: it holds other tables "
            f"(user_version {version}); not touching it"
        )
    return version, tables


def database_class() -> type[Database]:
    """sqlite_utils' Database, imported without numpy. sqlite_utils imports numpy whenever it can,
    only to map numpy's scalar types to column types (kvrepl never stores one), and numpy costs
    about 70 ms on the way to the prompt; so numpy is hidden while sqlite_utils is first imported
    (kvrepl opens its store before any thread that might import numpy starts)."""
    hide = "numpy" not in sys.modules and "sqlite_utils" not in sys.modules
    if hide:
        sys.modules["numpy"] = None  # type: ignore[assignment]  # `import numpy` then fails
    try:
        from sqlite_utils import Database
    finally:
        if hide:
            del sys.modules["numpy"]
    return Database


def open_database(path: Path | str, busy_timeout_s: float) -> tuple[Database, list[str]]:
    """Open (or create) the file, refuse it if it is not ours, migrate it if it is behind:
    (the database, the names of the migrations just applied). `":memory:"` opens no file."""
    memory = str(path) == ":memory:"
    try:
        if not memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=busy_timeout_s)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open the store at {path}: {e}") from e
    try:
        version, tables = inspect_file(conn, Path(path))
        conn.execute("PRAGMA foreign_keys = ON")
        if not memory:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL's usual pairing
        db = database_class()(conn, execute_plugins=False)
        applied: list[str] = []
        if version != SCHEMA_VERSION or "_migrations" not in tables:
            with write(db, busy_timeout_s):
                inspect_file(conn, Path(path))  # another process may have migrated meanwhile
                applied = apply_migrations(db)
    except sqlite3.Error as e:
        conn.close()
        raise store_error(e, busy_timeout_s) from e
    except BaseException:
        conn.close()
        raise
    return db, applied


@contextmanager
def write(db: Database, busy_timeout_s: float) -> Iterator[Database]:
    """One write transaction. sqlite-utils' atomic() issues a deferred BEGIN, whose later
    read-to-write upgrade fails at once (no busy wait) when another process wrote in between;
    BEGIN IMMEDIATE takes the write lock up front, where the busy timeout does apply."""
    conn = db.conn
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as e:
        raise store_error(e, busy_timeout_s) from e
    try:
        yield db
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(e, sqlite3.Error):
            raise store_error(e, busy_timeout_s) from e
        raise
