"""The conversation: one turn as data, from the user's line to the stored answer and snapshot.

`Chat` ties the rooms together: the Store (the truth: messages as a tree), the Prompt (messages to
ids), the Engine (the cache, reused down to the first changed token) and the KVStore (the cache on
disk). It writes the user's message before computing, stores the answer and the turn's stats in
one transaction when the turn ends (also when it is interrupted), then saves the new K/V. It
yields events and never prints; the REPL and the line loop render them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrepl.config import Settings
from kvrepl.errors import PromptError, StoreError, UsageError
from kvrepl.events import Finish, Notice, Stats, TextDelta, TurnEvent
from kvrepl.guards import deferred_interrupts
from kvrepl.models import LoadedModel
from kvrepl.prompt import Prompt, ThinkSplitter
from kvrepl.sessions import SessionHolder
from kvrepl.snapshots import Snapshots
from kvrepl.store import Message, Store, clean_text

if TYPE_CHECKING:  # torch and transformers load in the background, after the prompt is up
    from kvrepl.engine import Engine, Sampling
    from kvrepl.kvstore import KVStore

_ANSWER_ROOM = 16  # tokens an answer needs at least, beyond the prompt
# A conversation rendered within the context: (messages, ids, where each message starts, notes).
Fitted = tuple[list[dict[str, Any]], list[int], list[int], list[str]]


@dataclass
class Runtime:
    """What exists once the model is loaded."""

    loaded: LoadedModel
    prompt: Prompt
    engine: Engine

    @classmethod
    def build(cls, loaded: LoadedModel, settings: Settings) -> Runtime:
        from kvrepl.engine import Engine

        prompt = Prompt(loaded.tokenizer)
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            end_ids=prompt.end_token_ids(getattr(loaded.model, "generation_config", None)),
            context_length=loaded.context_length,
            reuse=settings.reuse,
        )
        return cls(loaded, prompt, engine)


class Chat(SessionHolder):
    """One open session over one model. `runtime` blocks until the model is loaded."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        kv: KVStore | None,
        runtime: Callable[[], Runtime],
        home: Path,
    ) -> None:
        super().__init__(store, home)
        self.base_settings = settings
        self._kv = kv
        self._runtime_fn = runtime
        self._rt: Runtime | None = None
        self.snapshots = Snapshots(lambda: self.kv)
        self.last_stats: Stats | None = None
        self.last_reason: str = ""
        self._notes_said = False  # the model's load notes are said once, with the first turn

    @property
    def kv(self) -> KVStore:
        """The snapshot store, opened on first use (it imports torch)."""
        if self._kv is None:
            from kvrepl.kvstore import KVStore

            self._kv = KVStore(self.home / "kv")
        return self._kv

    # -- the model ----------------------------------------------------------------------------
    @property
    def rt(self) -> Runtime:
        if self._rt is None:
            self._rt = self._runtime_fn()
        return self._rt

    @property
    def settings(self) -> Settings:
        overrides = self.session.settings if self.session else self._pending
        return self.base_settings.with_overrides(overrides)

    def sampling(self) -> Sampling:
        from kvrepl.engine import Sampling

        s = self.settings
        return Sampling(s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed, s.max_tokens)

    def delete(self, name_or_id: str) -> None:
        """Delete a session, its messages and its snapshot, holding its lock throughout (a
        session open in another kvrepl is refused)."""
        session = self.open(name_or_id)
        self.store.delete_session(session.id)
        self.kv.delete(session.id)
        if self._lock is not None:
            self._lock.release(remove=True)
        self._lock, self.session = None, None

    def _model_label(self) -> str:
        return self._rt.loaded.source.label if self._rt else (self.base_settings.model or "default")

    # -- the conversation ---------------------------------------------------------------------
    def prompt_messages(self, history: list[Message] | None = None) -> list[dict[str, Any]]:
        """The messages to render; an answer carries the ids it was generated as, if known."""
        history = self.history() if history is None else history
        msgs = [{"role": m.role, "content": m.content, **({"ids": list(m.token_ids)}
                 if m.token_ids else {})} for m in history]  # fmt: skip
        if self.settings.system:
            msgs.insert(0, {"role": "system", "content": self.settings.system})
        return msgs

    def send(self, text: str) -> Iterator[TurnEvent]:
        """Store the user's message, then answer it. A message that cannot fit is refused before
        it is stored (it stays in the input history)."""
        started = time.perf_counter()  # ttft counts from Enter: restoring a snapshot included
        text = clean_text(text)  # a lone surrogate (from a bad terminal byte) becomes U+FFFD
        fitted = self._check_message(text, self.history())
        session = self._ensure_session()
        self.store.add_message(session.id, "user", text)
        return self._answer(fitted, started)

    def edit(self, n: int, text: str) -> Iterator[TurnEvent]:
        """Replace user turn n (1-based) as a new branch; the old one stays in the database."""
        started = time.perf_counter()
        target = self._user_turn(n)
        text = clean_text(text)
        history = self.history()
        fitted = self._check_message(text, history[: history.index(target)])
        assert self.session is not None
        self.store.add_message(self.session.id, "user", text, parent_id=target.parent_id)
        return self._answer(fitted, started)

    def retry(self) -> Iterator[TurnEvent]:
        """Answer the last user message again, as a sibling of the previous answer."""
        started = time.perf_counter()
        _ = self.rt  # the model first: nothing moves on the branch until it can answer
        history = self.history()
        if not history:
            raise UsageError("nothing to retry yet")
        assert self.session is not None
        if history[-1].role == "assistant":
            self.store.set_head(self.session.id, history[-1].parent_id)
        return self._answer(started=started)

    def undo(self) -> int:
        """Drop the last exchange from the active branch (kept in the database); returns the
        number of user turns left."""
        turns = self.user_turns()
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

    def _user_turn(self, n: int) -> Message:
        turns = self.user_turns()
        if not 1 <= n <= len(turns):
            raise UsageError(f"there is no turn {n}: this conversation has {len(turns)}")
        return turns[n - 1]

    def _check_message(self, text: str, before: list[Message]) -> Fitted:
        """Refuse, before anything is stored or computed, a message that is empty or that cannot
        fit in the context after `before` (the messages it follows). Returns the rendering, which
        the turn then uses as it is."""
        if not text.strip():
            raise UsageError("empty message: type something, or /help")
        n = self.rt.prompt.count_tokens(text)
        limit = self.rt.engine.context_length - _ANSWER_ROOM
        if n > limit:
            raise PromptError(
                f"this message is {n:,} tokens; the model's context is "
                f"{self.rt.engine.context_length:,} tokens (at most {limit:,} for a message): "
                "shorten it or send it in parts"
            )
        msgs = [*self.prompt_messages(before), {"role": "user", "content": text}]
        return msgs, *self._fit(msgs)

    # -- one turn -----------------------------------------------------------------------------
    def _fit(self, msgs: list[dict[str, Any]]) -> tuple[list[int], list[int], list[str]]:
        """Render, within the context: an error with the numbers, or (opt-in) drop oldest turns."""
        rt, notes = self.rt, []
        think = self.settings.thinking
        ids, starts = rt.prompt.render_with_offsets(msgs, enable_thinking=think)
        limit = rt.engine.context_length - _ANSWER_ROOM
        dropped = 0
        while len(ids) > limit and self.settings.drop_oldest:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                break
            del msgs[first : first + 2]
            dropped += 1
            ids, starts = rt.prompt.render_with_offsets(msgs, enable_thinking=think)
        if len(ids) > limit:
            raise PromptError(
                f"the conversation is {len(ids):,} tokens; the model's context is "
                f"{rt.engine.context_length:,}: use /new to start over, /undo to drop the last "
                "exchange, /edit to shorten a turn, or `/set drop_oldest on` to drop old turns"
            )
        if dropped:
            notes.append(
                f"context: left out the oldest {dropped} exchange(s) to fit; "
                "the database keeps them"
            )
        return ids, starts, notes

    def _model_notes(self) -> list[str]:
        """What loading the model had to say (a built-in chat template, a fallback), once."""
        notes = self.rt.loaded.notes
        said, self._notes_said = self._notes_said, True
        return [] if said else list(notes)

    def bring(self, ids: list[int]) -> list[str]:
        """Before the engine runs `ids`: its cache brought to the longest prefix found in memory
        or on disk (a resumed session, a branch gone back to). One line per thing worth saying."""
        rt, session = self.rt, self.session
        if session is None:
            return []
        answered = any(m.role == "assistant" for m in self.history())
        return self.snapshots.bring(rt.engine, rt.loaded.fingerprint, ids, session.id, answered)

    def warm(self) -> tuple[int, int, list[str]]:
        """Bring the cache to the whole conversation now (after /load).
        Returns (reused, recomputed, notes)."""
        notes = self._model_notes()
        if not self.history():
            return 0, 0, notes
        engine = self.rt.engine
        ids = self.rt.prompt.render(
            self.prompt_messages(),
            add_generation_prompt=False,
            enable_thinking=self.settings.thinking,
        )
        notes += self.bring(ids)
        if len(ids) >= engine.context_length - _ANSWER_ROOM:
            return (
                0,
                0,
                [*notes, "the conversation fills the context: the next turn will say what to do"],
            )
        engine.prefill(ids)
        self._save_snapshot(notes)
        return engine.progress.reused, engine.progress.prefilled, notes

    def _answer(self, fitted: Fitted | None = None,
                started: float | None = None) -> Iterator[TurnEvent]:  # fmt: skip
        """Answer the head of the active branch (`fitted`: its rendering, if the caller has it).
        Whatever stops the turn (Ctrl-C anywhere in it, the consumer closing it), the user's
        message gets an answer, marked interrupted, with what was generated, and the engine's
        cache matches its ids."""
        self.last_stats, self.last_reason = None, "interrupted"
        splitter = ThinkSplitter()
        events: Iterator[TurnEvent] | None = None
        before = None  # the engine's progress before this turn's stream started
        stats: Stats | None = None
        reason = "interrupted"
        try:
            for line in self._model_notes():
                yield Notice(line)
            if fitted is None:
                msgs = self.prompt_messages()
                fitted = (msgs, *self._fit(msgs))
            msgs, ids, starts, notes = fitted
            for line in [*notes, *self.bring(ids)]:
                yield Notice(line)
            rt = self.rt
            keep, cached = rt.engine.plan(ids), len(rt.engine.pc.ids)
            if cached and keep < cached - 1:
                yield Notice(self._cut_line(msgs, starts, keep, len(ids), rt.engine.pc.croppable))
            splitter.in_think = rt.prompt.opens_in_think(ids)
            before = rt.engine.progress
            events = rt.engine.stream(ids, self.sampling(), started=started)
            for event in events:
                if isinstance(event, TextDelta):
                    yield from splitter.feed(event.text)
                elif isinstance(event, Finish):
                    reason = event.reason
                elif isinstance(event, Stats):
                    stats = event
                else:  # a long prefill's Progress: for the renderer
                    yield event
            yield from splitter.flush()
        except BaseException as exc:
            if events is not None:
                events.close()  # the engine cuts its cache back to what it computed
            splitter.flush()
            progress = self.rt.engine.progress if events is not None else None
            if progress is before:  # the stream never started: that is the last turn's
                progress = None
            # Nothing computed yet: no figures to show, zeros and no ids to store.
            self.last_stats = progress.stats() if progress else None
            if isinstance(exc, KeyboardInterrupt | GeneratorExit):
                figures = self.last_stats or Stats(0, 0, 0, 0.0, 0.0)
                generated = list(progress.generated) if progress else []
                self._store_answer(splitter, figures, True, generated, snapshot=events is not None)
            raise
        assert stats is not None
        self.last_stats, self.last_reason = stats, reason
        generated = list(self.rt.engine.progress.generated)
        for line in self._store_answer(splitter, stats, False, generated):
            yield Notice(line)
        yield Finish(reason)
        yield stats

    def _cut_line(
        self, msgs: list[dict[str, Any]], starts: list[int], keep: int, total: int, croppable: bool
    ) -> str:
        if not croppable:
            return (
                f"cache: this model's cache (chunked or linear-attention layers) cannot be cut: "
                f"rebuilding it, recomputing {total:,} tokens"
            )
        j = max((i for i, s in enumerate(starts) if 0 <= s <= keep), default=0)
        turn = sum(1 for m in msgs[: j + 1] if m["role"] == "user")
        where = f"turn {turn}, {msgs[j]['role']}" if msgs else "start"
        return f"cache: cut at token {keep:,} ({where}); recomputing {total - keep:,} tokens"

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
        self._refresh()
        return warnings

    def _save_snapshot(self, warnings: list[str]) -> None:
        assert self.session is not None
        rt = self.rt
        self.kv.budget = self.settings.kv_budget_mb << 20
        warnings += self.snapshots.save(self.session.id, rt.engine, rt.loaded.fingerprint)

    # -- figures ------------------------------------------------------------------------------
    def cache_figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "session": self.session.name or self.session.id if self.session else None
        }
        if self._rt is not None:
            figures["model"] = self._rt.loaded.source.label
            figures["weights"] = _weights_line(self._rt.loaded)
            figures["cached_tokens"] = len(self._rt.engine.pc.ids)
            figures["context_length"] = self._rt.engine.context_length
        if self.session is not None:
            fp = self._rt.loaded.fingerprint if self._rt is not None else None
            figures["snapshot_tokens"] = self.kv.n_tokens_on_disk(self.session.id, fp)
            figures["snapshot_bytes"] = self.kv.size_bytes(self.session.id, fp)
            figures["kv_pool_bytes"] = self.kv.pool_bytes()
            figures["kv_budget_bytes"] = self.kv.budget
            figures.update(self.store.session_totals(self.session.id))
        return figures


def _weights_line(loaded: LoadedModel) -> str:
    """How the model computes: the fast path's file weights and kernels, or a dtype."""
    model = loaded.model
    if getattr(model, "is_fast", False):
        kv = str(model.kv_dtype).removeprefix("torch.")
        return f"{model.weight_types} as in the file, {model.k.label}, {kv} K/V"
    return f"{loaded.dtype} on {loaded.device}"
