"""The session listing's data: what one line holds, and how its size and time cells read.

Owns `SessionRow` and the cells of a listing's line (`5.0 MiB`, `-` for no snapshot;
`2025-01-02 03:04`). Never prints (render.py lays the rows out) and never reads the store or the
snapshots (the commands gather the rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

SESSION_COLUMNS = ("name", "title", "turns", "tokens", "updated", "snapshot")


@dataclass(frozen=True)
class SessionRow:
    """One line of a session listing; `snapshot_bytes` is None when there is no snapshot."""

    name: str
    title: str
    turns: int
    tokens: int
    updated: datetime | str | float  # a float is a Unix time
    snapshot_bytes: int | None = None


def format_size(n_bytes: int | None) -> str:
    """`5.0 MiB`; `-` for no snapshot."""
    if n_bytes is None:
        return "-"
    if n_bytes < 1024:
        return f"{n_bytes} B"
    size = n_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_time(value: datetime | str | float) -> str:
    """A listing's time as local `YYYY-MM-DD HH:MM`: a `datetime`, a Unix time, or ISO text
    (the store's UTC timestamps); other text as is."""
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value)
    elif isinstance(value, str):
        try:
            value = datetime.fromisoformat(value).astimezone()
        except ValueError:
            return value
    return value.strftime("%Y-%m-%d %H:%M") if isinstance(value, datetime) else value


def session_cells(
    sessions: Iterable[SessionRow], current: str | None, *, tty: bool
) -> list[tuple[object, ...]]:
    """The listing's cells, one tuple per session: in a terminal the current session is marked
    with `*` and numbers and times are made readable; for scripts they stay as stored."""
    return [
        (f"* {s.name}" if tty and s.name == current else s.name, s.title, s.turns,
         f"{s.tokens:,}" if tty else s.tokens,
         # plain mode keeps the store's ISO text as is: scripts read it
         s.updated if not tty and isinstance(s.updated, str) else format_time(s.updated),
         format_size(s.snapshot_bytes))
        for s in sessions
    ]  # fmt: skip
