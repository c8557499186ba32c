"""Which session is open: switching, creating, naming and settings of sessions, with the lock
that makes this process their one writer. `Chat` builds on it; no model, no turns here."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from kvrepl.errors import UsageError
from kvrepl.guards import SessionLock
from kvrepl.store import Message, Session, Store


class SessionHolder:
    """The open session (None before the first message of a new one) and its lock."""

    def __init__(self, store: Store, home: Path) -> None:
        self.store = store
        self.home = home
        self.session: Session | None = None
        self._pending: dict[str, Any] = {}  # /set before the session exists: kept until it does
        self._lock: SessionLock | None = None

    def _model_label(self) -> str:
        """The model name stored with a new session (Chat knows it)."""
        return ""

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
        session = self._ensure_session()
        self.store.rename_session(session.id, name)
        return self._refresh()

    def set_option(self, key: str, value: Any) -> None:
        """A session setting; before the first message it waits in memory (no empty session)."""
        if self.session is None:
            self._pending[key] = value
            return
        self.store.update_settings(self.session.id, {key: value})
        self._refresh()

    def close(self) -> None:
        self._switch(None)

    def _ensure_session(self) -> Session:
        if self.session is None:
            settings, self._pending = self._pending, {}
            self._switch(self.store.create_session(None, self._model_label(), settings))
        assert self.session is not None
        return self.session

    def _refresh(self) -> Session:
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
