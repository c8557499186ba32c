"""Which session is open: switching, creating, naming and settings of sessions, with the lock
that makes this process their one writer, the settings overlay and the active branch's history.
The conversation (conversation.py) holds one; no model, no turns here."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrepl.chat.guards import SessionLock
from kvrepl.config import SESSION_KEYS, Settings
from kvrepl.errors import UsageError
from kvrepl.store.db import Store
from kvrepl.store.records import Message, Session


class OpenSession:
    """The open session (None before the first message of a new one), its lock, and its
    settings laid over `base`. `model_label` names the model stored with a new session."""

    def __init__(self, store: Store, home: Path, base: Settings,
                 model_label: Callable[[], str] = lambda: "") -> None:  # fmt: skip
        self.store = store
        self.home = home
        self.base = base
        self._model_label = model_label
        self.session: Session | None = None
        self._pending: dict[str, Any] = {}  # /set before the session exists: kept until it does
        self._lock: SessionLock | None = None

    @property
    def settings(self) -> Settings:
        """The settings in force: the base ones with this session's `/set` values over them (only
        those `/set` may still change: a session that stored kv_budget_mb before the budget became
        the store's has it ignored)."""
        stored = self.session.settings if self.session else self._pending
        kept = {k: v for k, v in stored.items() if k in SESSION_KEYS or k == "thinking"}
        return self.base.with_overrides(kept)  # thinking: /think's, which has no /set key

    @property
    def label(self) -> str:
        """The open session's name, or its id; "" before it exists."""
        return (self.session.name or self.session.id) if self.session else ""

    def _switch(self, session: Session | None) -> None:
        """Make `session` the open one. Its lock is taken before the current one is let go, so
        a refusal leaves the current session open and locked."""
        lock = SessionLock(self.home / "locks", session.id) if session is not None else None
        if self._lock is not None:
            self._lock.release()
        self._lock, self.session = lock, session

    def new_session(self, name: str | None = None) -> Session | None:
        """Start afresh; with a name the session exists at once, else at its first message."""
        fresh = self.store.create_session(name, model=self._model_label()) if name else None
        self._switch(fresh)
        return self.session

    def open(self, name_or_id: str) -> Session:
        session = self.store.get_session(name_or_id)
        if session is None:
            names = [s.name for s in self.store.list_sessions() if s.name]
            close = difflib.get_close_matches(name_or_id, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"no session {name_or_id!r}{hint}")
        if self.session is None or session.id != self.session.id:
            self._switch(session)
        return session

    def open_or_create(self, name: str) -> Session:
        if self.store.get_session(name) is not None:
            return self.open(name)
        self._switch(self.store.create_session(name, model=self._model_label()))
        assert self.session is not None
        return self.session

    def resume_latest(self) -> Session:
        latest = self.store.latest_session()
        if latest is None:
            raise UsageError("there is no session to resume yet")
        return self.open(latest.id)

    def rename(self, name: str) -> Session:
        session = self.ensure()
        self.store.rename_session(session.id, name)
        return self.refresh()

    def set_option(self, key: str, value: Any) -> None:
        """A session setting; before the first message it waits in memory (no empty session)."""
        if self.session is None:
            self._pending[key] = value
            return
        self.store.update_settings(self.session.id, {key: value})
        self.refresh()

    def close(self) -> None:
        self._switch(None)

    def delete(self, name_or_id: str, drop_snapshots: Callable[[str], None]) -> None:
        """Delete a session and its messages (`drop_snapshots` its K/V), holding its lock
        throughout (a session open in another kvrepl is refused)."""
        session = self.open(name_or_id)
        self.store.delete_session(session.id)
        drop_snapshots(session.id)
        if self._lock is not None:
            self._lock.release(remove=True)
        self._lock, self.session = None, None

    def ensure(self) -> Session:
        """The open session, created now if it does not exist yet."""
        if self.session is None:
            settings, self._pending = self._pending, {}
            self._switch(self.store.create_session(None, self._model_label(), settings))
        assert self.session is not None
        return self.session

    def refresh(self) -> Session:
        """The open session as the store holds it now."""
        assert self.session is not None
        fresh = self.store.get_session(self.session.id)
        assert fresh is not None
        self.session = fresh
        return fresh

    def history(self) -> list[Message]:
        return self.store.active_branch(self.session.id) if self.session else []

    def unanswered_note(self) -> str | None:
        """A line for a session whose last message never got its answer (kvrepl was stopped)."""
        history = self.history()
        if history and history[-1].role == "user":
            return "the last message has no answer (kvrepl stopped during it): /retry answers it"
        return None

    def user_turns(self) -> list[Message]:
        return [m for m in self.history() if m.role == "user"]

    def user_turn(self, n: int) -> Message:
        """User turn n (1-based) of the active branch; UsageError when there is none."""
        turns = self.user_turns()
        if not 1 <= n <= len(turns):
            raise UsageError(f"there is no turn {n}: this conversation has {len(turns)}")
        return turns[n - 1]
