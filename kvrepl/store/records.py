"""The records the conversation store hands out (a session, a message, a session's summary, a
branch seen from the active one) and the one rule for text it takes in (`clean_text`). Plain
frozen data: no SQL, nothing read or written (db.py does that).
"""

from dataclasses import dataclass
from typing import Any


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
    token_ids: tuple[int, ...] | None = None  # an answer's generated ids (None: not known)


@dataclass(frozen=True)
class SessionSummary:
    id: str
    name: str | None
    title: str
    model: str
    turns: int  # user messages on the active branch
    created: str
    updated: str
    # The conversation's length in tokens at its last answer (its prompt and the answer): the
    # figures of the last answer on the active branch that got past its prompt; 0 before one.
    tokens: int = 0


@dataclass(frozen=True)
class Branch:
    """One leaf of a session's tree, seen from the active branch."""

    leaf: Message
    length: int  # messages from the root to the leaf
    shared: int  # leading messages in common with the active branch
    fork_id: int | None  # last message shared with the active branch (None: different root)
    diverges: Message | None  # first message not on the active branch (None: on it)
    active: bool  # the leaf is the session's head


def clean_text(text: str) -> str:
    """Replace lone surrogates (which SQLite cannot encode) with U+FFFD; keep valid pairs."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
