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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrepl.chat.guards import deferred_interrupts
from kvrepl.chat.handle import ModelHandle
from kvrepl.chat.prompt import ThinkSplitter
from kvrepl.chat.sessions import OpenSession
from kvrepl.chat.snapshots import Snapshots
from kvrepl.chat.thinkbudget import think_budget
from kvrepl.chat.turn import Result, Turn
from kvrepl.config import Settings
from kvrepl.errors import PromptError, StoreError, UsageError
from kvrepl.events import Finish, Notice, Stats, TextDelta, TurnEvent
from kvrepl.store.db import Store
from kvrepl.store.records import Message, Session, clean_text

if TYPE_CHECKING:  # torch and transformers load in the background, after the prompt is up
    from kvrepl.engine.engine import Plan, Sampling
    from kvrepl.store.kvbook import Pool
    from kvrepl.store.kvstore import KVStore

_ANSWER_ROOM = 16  # tokens an answer needs at least, beyond the prompt
# A conversation rendered within the context: (messages, ids, where each message starts, notes).
Fitted = tuple[list[dict[str, Any]], list[int], list[int], list[str]]


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

    def send(self, text: str) -> Turn:
        """Store the user's message, then answer it. A message that cannot fit is refused before
        it is stored (it stays in the input history)."""
        started = time.perf_counter()  # ttft counts from Enter: restoring a snapshot included
        text = clean_text(text)  # a lone surrogate (from a bad terminal byte) becomes U+FFFD
        fitted = self._check_message(text, self.history())
        session = self.sessions.ensure()
        self.store.add_message(session.id, "user", text)
        return Turn(lambda result: self._answer(result, fitted, started))

    def edit(self, n: int, text: str) -> Turn:
        """Replace user turn n (1-based) as a new branch; the old one stays in the database."""
        started = time.perf_counter()
        target = self.sessions.user_turn(n)
        text = clean_text(text)
        history = self.history()
        fitted = self._check_message(text, history[: history.index(target)])
        assert self.session is not None
        self.store.add_message(self.session.id, "user", text, parent_id=target.parent_id)
        return Turn(lambda result: self._answer(result, fitted, started))

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
        return Turn(lambda result: self._answer(result, None, started))

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
        _check_fits("message", rt.prompt.count_tokens(text), rt.engine.context_length)
        msgs = [*self.prompt_messages(before), {"role": "user", "content": text}]
        return msgs, *self._fit(msgs)

    # -- one turn -----------------------------------------------------------------------------
    def _fit(self, msgs: list[dict[str, Any]]) -> tuple[list[int], list[int], list[str]]:
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
        _check_fits("conversation", len(ids), rt.engine.context_length)
        if dropped:
            notes.append(
                f"context: left out the oldest {dropped} exchange(s) to fit; "
                "the database keeps them"
            )
        return ids, starts, notes

    def _model_notes(self) -> list[str]:
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
        notes = self._model_notes()
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
            _check_fits("conversation", len(ids), engine.context_length)
        except PromptError as exc:
            return 0, 0, [*notes, str(exc)]
        engine.prefill(ids)
        self._save_snapshot(notes)
        return engine.progress.reused, engine.progress.prefilled, notes

    def _answer(self, result: Result, fitted: Fitted | None,
                started: float | None) -> Iterator[TurnEvent]:  # fmt: skip
        """Answer the head of the active branch (`fitted`: its rendering, if the caller has it),
        filling `result`. Whatever stops the turn (Ctrl-C anywhere in it, the consumer closing
        it), the user's message gets an answer, marked interrupted, with what was generated, and
        the engine's cache matches its ids."""
        splitter = ThinkSplitter()
        rt = self.model.get()
        events: Iterator[TurnEvent] | None = None
        cut_said = False
        before = rt.engine.progress  # the last turn's: this one's stream has not started
        try:
            for line in self._model_notes():
                yield Notice(line)
            if fitted is None:
                msgs = self.prompt_messages()
                fitted = (msgs, *self._fit(msgs))
            msgs, ids, starts, notes = fitted
            for line in [*notes, *self.bring(ids)]:
                yield Notice(line)
            plan = rt.engine.align(ids)
            if self.settings.reuse and plan.cached and plan.keep < plan.cached - 1:
                yield Notice(_cut_line(msgs, starts, plan))  # --no-reuse cuts every turn: silent
            splitter.in_think = rt.prompt.opens_in_think(ids)
            budget = think_budget(self.settings.think_budget, rt.prompt, splitter.in_think)
            events = rt.engine.stream(ids, self.sampling(), started=started, steer=budget)
            for event in events:
                if isinstance(event, TextDelta):
                    yield from splitter.feed(event.text)
                    if budget is not None and budget.cut_at is not None and not cut_said:
                        cut_said = True  # said once, when the close is forced
                        yield Notice(f"thinking cut at {budget.cut_at:,} tokens (think_budget)")
                elif isinstance(event, Finish):
                    result.finish_reason = event.reason
                elif isinstance(event, Stats):
                    result.stats = event
                else:  # a long prefill's Progress: for the renderer
                    yield event
            yield from splitter.flush()
        except BaseException as exc:
            if events is not None:
                events.close()  # the engine cuts its cache back to what it computed
            splitter.flush()
            progress = rt.engine.progress if rt.engine.progress is not before else None
            # Nothing computed yet: no figures to show, zeros and no ids to store.
            result.stats = progress.stats() if progress else None
            if isinstance(exc, KeyboardInterrupt | GeneratorExit):
                result.interrupted = True
                figures = result.stats or Stats(0, 0, 0, 0.0, 0.0)
                generated = list(progress.generated) if progress else []
                self._store_answer(splitter, figures, True, generated, snapshot=events is not None)
            raise
        assert result.stats is not None and result.finish_reason is not None
        generated = list(rt.engine.progress.generated)
        for line in self._store_answer(splitter, result.stats, False, generated):
            yield Notice(line)
        yield Finish(result.finish_reason)
        yield result.stats

    def _store_answer(self, splitter: ThinkSplitter, stats: Stats, interrupted: bool,
                      generated: list[int], *, snapshot: bool = True) -> list[str]:  # fmt: skip
        """Store the answer with the ids it was generated as (all of them, thinking included:
        the rendering uses them only where they spell the stored answer), then the snapshot."""
        assert self.session is not None
        warnings: list[str] = []
        with deferred_interrupts():
            self.store.finish_answer(self.session.id, splitter.answer, think=splitter.think or None,
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


def prompt_room(context: int) -> int:
    """The most tokens a prompt may hold: the context less the room an answer needs."""
    return context - _ANSWER_ROOM


def _check_fits(what: str, n: int, context: int) -> None:
    """The one context check, before anything is stored or computed: a message or a whole
    conversation of `n` tokens must leave an answer room in the context."""
    if n <= prompt_room(context):
        return
    if what == "message":
        raise PromptError(f"this message is {n:,} tokens; the model's context is {context:,} "
                          f"tokens (at most {prompt_room(context):,} for a message): shorten it "
                          "or send it in parts")  # fmt: skip
    raise PromptError(
        f"the conversation is {n:,} tokens; the model's context is {context:,}: use /new to start "
        "over, /undo to drop the last exchange, /edit to shorten a turn, or `/set drop_oldest on` "
        "to drop old turns"
    )


def _tokens(n: int) -> str:
    return f"{n:,} token" + ("" if n == 1 else "s")


def _cut_line(msgs: list[dict[str, Any]], starts: list[int], plan: Plan) -> str:
    """The notice for a prefill that cuts the cache back: where (the turn and role of the
    message it falls in) and how much is recomputed."""
    total = plan.keep + plan.recompute
    if plan.why == "cannot cut":
        return (
            f"cache: this model's cache (chunked or linear-attention layers) cannot be cut: "
            f"rebuilding it, recomputing {_tokens(total)}"
        )
    j = max((i for i, s in enumerate(starts) if 0 <= s <= plan.keep), default=0)
    turn = sum(1 for m in msgs[: j + 1] if m["role"] == "user")
    where = f"turn {turn}, {msgs[j]['role']}" if msgs else "start"
    return f"cache: cut at token {plan.keep:,} ({where}); recomputing {_tokens(plan.recompute)}"
