"""The conversation: one turn as data, from the user's line to the stored answer and snapshot.

`Conversation` ties the rooms together: the open session (sessions.py: the session, its lock, its
settings, its history in the Store), the model (handle.py: the Prompt and the Engine, whose cache
is reused down to the first changed token) and the snapshots (snapshots.py over the KVStore).
`send`, `edit` and `retry` return a Turn (turn.py). It writes the user's message before
computing, stores the answer and the turn's stats in one transaction when the turn ends (also
when it is interrupted), then saves the new K/V. It never prints; the REPL and the line loop
render a turn's events.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrepl.chat.answer import Answer, Fitted
from kvrepl.chat.guards import deferred_interrupts
from kvrepl.chat.handle import ModelHandle
from kvrepl.chat.sessions import OpenSession
from kvrepl.chat.snapshots import Snapshots
from kvrepl.chat.turn import Turn
from kvrepl.config import Settings
from kvrepl.context import check_fits, prompt_room
from kvrepl.errors import PromptError, StoreError, UsageError
from kvrepl.events import Stats
from kvrepl.store.db import Store
from kvrepl.store.records import Branch, Message, Session, SessionSummary, clean_text

if TYPE_CHECKING:  # torch and transformers load in the background, after the prompt is up
    from kvrepl.engine.engine import Sampling
    from kvrepl.store.kvbook import Pool
    from kvrepl.store.kvstore import KVStore



class Conversation:
    """The conversation: one open session (`sessions`) over one model (`model`, a handle that
    may still be loading). `send`, `edit` and `retry` return a Turn."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        kv: KVStore | None,
        model: ModelHandle,
        home: Path,
    ) -> None:
        self.store = store
        self.home = home
        self.model = model
        self.sessions = OpenSession(store, home, settings, lambda: model.label)
        self._kv = kv
        self.snapshots = Snapshots(lambda: self.kv)
        self._notes_said = False  # the model's load notes are said once, with the first turn
        self._owns_store = False

    @classmethod
    def at(cls, home: Path, settings: Settings, model: ModelHandle) -> Conversation:
        """A conversation over the store in `home` (its database opened here, closed by
        `close`)."""
        chat = cls(settings, Store(home / "kvrepl.db"), None, model, home)
        chat._owns_store = True
        return chat

    def close(self) -> None:
        """Let the open session go; the database too when this conversation opened it."""
        self.sessions.close()
        if self._owns_store:
            self.store.close()

    @property
    def kv(self) -> KVStore:
        """The snapshot store, opened on first use (it imports torch)."""
        if self._kv is None:
            from kvrepl.store.kvstore import KVStore

            self._kv = KVStore(self.home / "kv")
        return self._kv

    @property
    def pool(self) -> Pool:
        """The K/V pool's books (what is on disk, by session) without opening the snapshot store,
        which imports torch: `kvrepl sessions` answers without it."""
        if self._kv is not None:
            return self._kv
        from kvrepl.store.kvbook import Pool

        return Pool(self.home / "kv")

    @property
    def session(self) -> Session | None:
        return self.sessions.session

    @property
    def settings(self) -> Settings:
        return self.sessions.settings

    def history(self) -> list[Message]:
        return self.sessions.history()

    def sampling(self) -> Sampling:
        from kvrepl.engine.engine import Sampling

        return Sampling.from_settings(self.settings)

    def thinking_switch(self) -> bool | None:
        """Whether the model's template has a thinking switch; None while it is not loaded."""
        rt = self.model.peek()
        return None if rt is None else rt.prompt.supports_thinking

    def delete(self, name_or_id: str) -> None:
        """Delete a session, its messages and its snapshot (refused while another kvrepl holds
        it)."""
        self.sessions.delete(name_or_id, lambda sid: self.kv.delete(sid))

    # -- the conversation ---------------------------------------------------------------------
    def prompt_messages(self, history: list[Message] | None = None) -> list[dict[str, Any]]:
        """The messages to render; an answer carries the ids it was generated as, if known."""
        history = self.history() if history is None else history
        msgs = [{"role": m.role, "content": m.content, **({"ids": list(m.token_ids)}
                 if m.token_ids else {})} for m in history]  # fmt: skip
        if self.settings.system:
            msgs.insert(0, {"role": "system", "content": self.settings.system})
        return msgs

    def send(self, text: str, *, started: float | None = None, waited: float = 0.0) -> Turn:
        """Store the user's message, then answer it. A message that cannot fit is refused before
        it is stored (it stays in the input history). `started`: when Enter was pressed (the
        ttft counts from there: a wait for the model and a snapshot's restore included);
        `waited`: how much of that went to waiting for the model, which the figures say."""
        started = time.perf_counter() if started is None else started
        text = clean_text(text)  # a lone surrogate (from a bad terminal byte) becomes U+FFFD
        fitted = self._check_message(text, self.history())
        session = self.sessions.ensure()
        self.store.add_message(session.id, "user", text)
        return Turn(lambda result: Answer(self, result, fitted, started, waited).run())

    def edit(self, n: int, text: str) -> Turn:
        """Replace user turn n (1-based) as a new branch; the old one stays in the database."""
        started = time.perf_counter()
        target = self.sessions.user_turn(n)
        text = clean_text(text)
        history = self.history()
        fitted = self._check_message(text, history[: history.index(target)])
        assert self.session is not None
        self.store.add_message(self.session.id, "user", text, parent_id=target.parent_id)
        return Turn(lambda result: Answer(self, result, fitted, started).run())

    def retry(self) -> Turn:
        """Answer the last user message again, as a sibling of the previous answer."""
        started = time.perf_counter()
        self.model.get()  # the model first: nothing moves on the branch until it can answer
        history = self.history()
        if not history:
            raise UsageError("nothing to retry yet")
        assert self.session is not None
        if history[-1].role == "assistant":
            self.store.set_head(self.session.id, history[-1].parent_id)
        return Turn(lambda result: Answer(self, result, None, started).run())

    def undo(self) -> int:
        """Drop the last exchange from the active branch (kept in the database); returns the
        number of user turns left."""
        turns = self.sessions.user_turns()
        if not turns:
            raise UsageError("nothing to undo")
        assert self.session is not None
        self.store.set_head(self.session.id, turns[-1].parent_id)
        return len(turns) - 1

    def switch_branch(self, message_id: int) -> None:
        if self.session is None:
            raise UsageError("no branches yet")
        session = self.session
        leaves = {b.leaf.id for b in self.store.branches(session.id)}
        ids = {m.id for m in self.store.active_branch(session.id)}
        if message_id not in leaves and message_id not in ids:
            try:
                self.store.message(message_id)
            except StoreError:
                raise UsageError(f"no message {message_id} in this session") from None
        self.store.set_head(session.id, message_id)

    def measure(self, text: str) -> tuple[int, int]:
        """The tokens `text` takes as a message, and the most a message may take (the context
        less an answer's room)."""
        rt = self.model.get()
        return rt.prompt.count_tokens(text), prompt_room(rt.engine.context_length)

    def _check_message(self, text: str, before: list[Message]) -> Fitted:
        """Refuse, before anything is stored or computed, a message that is empty or that cannot
        fit in the context after `before` (the messages it follows). Returns the rendering, which
        the turn then uses as it is."""
        if not text.strip():
            raise UsageError("empty message: type something, or /help")
        rt = self.model.get()
        check_fits("message", rt.prompt.count_tokens(text), rt.engine.context_length)
        msgs = [*self.prompt_messages(before), {"role": "user", "content": text}]
        return msgs, *self.fit(msgs)

    # -- one turn -----------------------------------------------------------------------------
    def fit(self, msgs: list[dict[str, Any]]) -> tuple[list[int], list[int], list[str]]:
        """Render, within the context: an error with the numbers, or (opt-in) drop oldest turns."""
        rt, notes = self.model.get(), []
        think = self.settings.thinking
        ids, starts = rt.prompt.render_with_offsets(msgs, enable_thinking=think)
        dropped = 0
        while len(ids) > prompt_room(rt.engine.context_length) and self.settings.drop_oldest:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                break
            del msgs[first : first + 2]
            dropped += 1
            ids, starts = rt.prompt.render_with_offsets(msgs, enable_thinking=think)
        check_fits("conversation", len(ids), rt.engine.context_length)
        if dropped:
            notes.append(
                f"context: left out the oldest {dropped} exchange(s) to fit; "
                "the database keeps them"
            )
        return ids, starts, notes

    def model_notes(self) -> list[str]:
        """What loading the model had to say (a built-in chat template, a fallback), once."""
        notes = self.model.get().loaded.notes
        said, self._notes_said = self._notes_said, True
        return [] if said else list(notes)

    def bring(self, ids: list[int]) -> list[str]:
        """Before the engine runs `ids`: its cache brought to the longest prefix found in memory
        or on disk (a resumed session, a branch gone back to). One line per thing worth saying."""
        rt, session = self.model.get(), self.session
        if session is None:
            return []
        answered = any(m.role == "assistant" for m in self.history())
        return self.snapshots.bring(rt.engine, rt.loaded.fingerprint, ids, session.id, answered,
                                    rt.loaded.other_pools())  # fmt: skip

    def warm(self) -> tuple[int, int, list[str]]:
        """Bring the cache to the whole conversation now (after /load).
        Returns (reused, recomputed, notes)."""
        notes = self.model_notes()
        if not self.history():
            return 0, 0, notes
        rt = self.model.get()
        engine = rt.engine
        ids = rt.prompt.render(
            self.prompt_messages(),
            add_generation_prompt=False,
            enable_thinking=self.settings.thinking,
        )
        notes += self.bring(ids)
        try:
            check_fits("conversation", len(ids), engine.context_length)
        except PromptError as exc:
            return 0, 0, [*notes, str(exc)]
        engine.prefill(ids)
        self._save_snapshot(notes)
        return engine.progress.reused, engine.progress.prefilled, notes

    def store_answer(self, answer: str, think: str | None, stats: Stats, interrupted: bool,
                     generated: list[int], *, snapshot: bool = True) -> list[str]:  # fmt: skip
        """Store a turn's answer, its figures and the ids it was generated as, then (`snapshot`)
        save the new K/V, in one step a second Ctrl-C waits for. Returns the snapshot's
        warnings."""
        assert self.session is not None
        warnings: list[str] = []
        with deferred_interrupts():
            self.store.finish_answer(self.session.id, answer, think=think,
                                     interrupted=interrupted, stats=stats.as_dict(),
                                     token_ids=generated)  # fmt: skip
            if snapshot:
                self._save_snapshot(warnings)
        self.sessions.refresh()
        return warnings

    def _save_snapshot(self, warnings: list[str]) -> None:
        assert self.session is not None
        rt = self.model.get()
        self.kv.budget = self.settings.kv_budget_mb << 20
        warnings += self.snapshots.save(self.session.id, rt.engine, rt.loaded.fingerprint)

    # -- what is kept, for the listings and exports (the app never reaches the store) ---------
    def find_session(self, name_or_id: str) -> Session | None:
        return self.store.get_session(name_or_id)

    def summaries(self) -> list[SessionSummary]:
        """Every stored session's summary, newest first."""
        return self.store.list_sessions()

    def summary(self, session: Session) -> SessionSummary:
        return self.store.summary(session.id)

    def branches(self) -> list[Branch]:
        """The open session's branches (none before its first message)."""
        return self.store.branches(self.session.id) if self.session is not None else []

    def transcript(self, session: Session) -> tuple[list[Message], dict[int, dict[str, Any]]]:
        """A session's active branch, and each answer's stored figures by message id."""
        stats = {m.id: s for m, s in self.store.turn_stats(session.id)}
        return self.store.active_branch(session.id), stats

    def on_disk(self, session_id: str) -> tuple[int, int]:
        """A session's snapshot: the tokens its last save holds, and the bytes of its chunks
        (every branch it saved), read from the pool's books without torch."""
        _, chain, _ = self.pool.last_chain(session_id)
        return (chain[-1].end if chain else 0), self.pool.size_bytes(session_id)

    def pool_bytes(self) -> int:
        """The K/V pool's size on disk, all sessions."""
        return self.pool.pool_bytes()

    # -- figures ------------------------------------------------------------------------------
    def cache_figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"session": self.sessions.label or None}
        rt = self.model.peek()
        if rt is not None:
            figures["model"] = rt.loaded.source.label
            figures["weights"] = rt.engine.runner.describe()
            figures["cached_tokens"] = rt.engine.cached_tokens
            figures["context_length"] = rt.engine.context_length
        if self.session is not None:
            figures["kv_pool_bytes"] = self.kv.pool_bytes()
            figures["kv_budget_bytes"] = self.kv.budget
            figures.update(self.store.session_totals(self.session.id))
        return figures

