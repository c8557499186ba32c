"""The session listing's data: what one line holds, and how its size and time cells read.

Owns `SessionRow`, the figures of a session as every surface names and counts them (`/sessions`,
`kvrepl sessions`, `/stats`, an export):

    turns          the user's messages on the active branch (what /history numbers)
    tokens         the conversation's length in tokens at its last answer (prompt and answer)
    cached         tokens of it that the session's snapshot on disk restores (its last save)
    on disk        bytes of the session's K/V chunks, every branch it saved; two sessions that
                   share a chunk each count it, so the pool's total is said once, apart

and the cells of a listing's line (`5.0 MiB`, `-` for no snapshot; `2025-01-02 03:04`). Never
prints (render.py lays the rows out) and never reads the store or the snapshots (the commands
gather the rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

SESSION_COLUMNS = ("name", "title", "turns", "tokens", "cached", "on disk", "updated")


@dataclass(frozen=True)
class SessionRow:
    """One line of a session listing; `bytes_on_disk` is None when there is no snapshot."""

    name: str
    title: str
    turns: int
    tokens: int
    cached_tokens: int
    updated: datetime | str | float  # a float is a Unix time
    bytes_on_disk: int | None = None
    id: str = ""

    def as_dict(self) -> dict[str, object]:
        """The row for scripts (`--json`, an export's JSON): the figures under their long names."""
        return {"id": self.id or self.name, "name": self.name, "title": self.title,
                "turns": self.turns, "tokens": self.tokens, "cached_tokens": self.cached_tokens,
                "bytes_on_disk": self.bytes_on_disk or 0, "updated": self.updated}  # fmt: skip

    def figures(self) -> list[tuple[str, str]]:
        """The four figures as `/stats` and a Markdown export show them, labelled as the
        listing's columns."""
        return [("turns", f"{self.turns:,}"), ("tokens", f"{self.tokens:,}"),
                ("cached", f"{self.cached_tokens:,}"),
                ("on disk", format_size(self.bytes_on_disk))]  # fmt: skip


def pool_line(pool_bytes: int, budget_bytes: int | None = None) -> str:
    """The line under a listing: the K/V pool's real size, a chunk sessions share counted once."""
    budget = f" (of {format_size(budget_bytes)} allowed)" if budget_bytes else ""
    return (f"all sessions: {format_size(pool_bytes)} of K/V on disk{budget}; a chunk sessions "
            "share counts in each one's \"on disk\", once here")  # fmt: skip


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
         f"{s.cached_tokens:,}" if tty else s.cached_tokens,
         format_size(s.bytes_on_disk),
         # plain mode keeps the store's ISO text as is: scripts read it
         s.updated if not tty and isinstance(s.updated, str) else format_time(s.updated))
        for s in sessions
    ]  # fmt: skip
