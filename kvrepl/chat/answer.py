"""One turn's answer, in named steps: from the head of the active branch to the stored answer and
the saved snapshot.

    prepare   the model's load notes (once), the rendering within the context, and the cache
              brought to the longest prefix in memory or on disk (snapshots.py)
    relay     the engine's events as the screen's: the prefill's plan as a cut line, the text
              split into thinking and answer, a long prefill's progress; the finish and the
              figures go into the turn's Result, which the screen reads once, at the end
    store     the answer, with the ids it was generated as, and the snapshot, in one step that a
              second Ctrl-C cannot split
    stopped   whatever stops the turn (Ctrl-C anywhere, the consumer closing it): the engine is
              closed first (its cache cut back to what it computed), then what was generated is
              stored, marked interrupted

Whether the engine began is told by its first event, the Plan, which it yields before computing
anything: once the turn has gone past it (its cut line said), the engine is at work. Never
prints; never touches the cache but through the engine and the snapshots.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from kvrepl.chat.prompt import ThinkSplitter
from kvrepl.chat.thinkbudget import ThinkBudget, think_budget
from kvrepl.chat.turn import Result
from kvrepl.events import Finish, Notice, Plan, Stats, TextDelta, TurnEvent

if TYPE_CHECKING:
    from kvrepl.chat.handle import ModelHandle, Runtime
    from kvrepl.config import Settings
    from kvrepl.engine.engine import Sampling

# A conversation rendered within the context: (messages, ids, where each message starts, notes).
Fitted = tuple[list[dict[str, Any]], list[int], list[int], list[str]]


class Answering(Protocol):
    """What an answer asks of the conversation (conversation.py's `Conversation`)."""

    model: ModelHandle
    settings: Settings

    def model_notes(self) -> list[str]: ...
    def prompt_messages(self) -> list[dict[str, Any]]: ...
    def fit(self, msgs: list[dict[str, Any]]) -> tuple[list[int], list[int], list[str]]: ...
    def bring(self, ids: list[int]) -> list[str]: ...
    def sampling(self) -> Sampling: ...
    def store_answer(self, answer: str, think: str | None, stats: Stats, interrupted: bool,
                     generated: list[int], *, snapshot: bool = True) -> list[str]: ...  # fmt: skip


class Answer:
    """The answer to the head of `chat`'s active branch (`fitted`: its rendering when the caller
    has it), filling `result`; `started` (perf_counter) is when the user pressed Enter."""

    def __init__(self, chat: Answering, result: Result, fitted: Fitted | None,
                 started: float | None, waited: float = 0.0) -> None:  # fmt: skip
        self.chat, self.result, self.fitted, self.started = chat, result, fitted, started
        self.waited = waited  # of the time since `started`, the wait for the model
        self.rt: Runtime = chat.model.get()
        self.splitter = ThinkSplitter()
        self.budget: ThinkBudget | None = None
        self.plan: Plan | None = None  # the engine's first event: it has begun
        self.events: Iterator[TurnEvent] | None = None

    def run(self) -> Iterator[TurnEvent]:
        try:
            ids = yield from self.prepare()
            yield from self.relay(ids)
        except BaseException as exc:
            self.stopped(exc)
            raise
        assert self.result.stats is not None and self.result.finish_reason is not None
        for line in self.store(False):
            yield Notice(line)

    def prepare(self) -> Iterator[TurnEvent]:
        """Notices: the load notes, a fit's, the snapshot's; returns the ids to answer."""
        chat = self.chat
        for line in chat.model_notes():
            yield Notice(line)
        if self.fitted is None:
            msgs = chat.prompt_messages()
            self.fitted = (msgs, *chat.fit(msgs))
        msgs, ids, _, notes = self.fitted
        for line in [*notes, *chat.bring(ids)]:
            yield Notice(line)
        return ids

    def relay(self, ids: list[int]) -> Iterator[TurnEvent]:
        """Stream the engine's answer to `ids` as the screen's events."""
        rt, settings, splitter = self.rt, self.chat.settings, self.splitter
        splitter.in_think = rt.prompt.opens_in_think(ids)
        self.budget = think_budget(settings.think_budget, rt.prompt, splitter.in_think)
        self.events = rt.engine.stream(ids, self.chat.sampling(), started=self.started,
                                       steer=self.budget)  # fmt: skip
        cut_said = False
        for event in self.events:
            if isinstance(event, TextDelta):
                yield from splitter.feed(event.text)
                if not cut_said and self.budget is not None and self.budget.cut_at is not None:
                    cut_said = True  # said once, when the close is forced
                    yield Notice(f"thinking cut at {self.budget.cut_at:,} tokens (think_budget)")
            elif isinstance(event, Plan):
                if settings.reuse and event.cached and event.keep < event.cached - 1:
                    yield Notice(cut_line(self.fitted, event))  # --no-reuse cuts every turn
                self.plan = event  # stopped from here on, the engine had begun its work
            elif isinstance(event, Finish):
                self.result.finish_reason = event.reason
            elif isinstance(event, Stats):
                self.result.stats = replace(event, model_wait_s=self.waited)
            else:  # a long prefill's Progress
                yield event
        yield from splitter.flush()

    def stopped(self, exc: BaseException) -> None:
        """The turn stopped before its end: the engine closed, and on an interrupt (Ctrl-C, or
        the consumer closing the turn) what was generated stored as an interrupted answer."""
        if self.events is not None:
            self.events.close()  # the engine cuts its cache back to what it computed
        self.splitter.flush()
        progress = self.rt.engine.progress if self.plan is not None else None
        self.result.stats = progress.stats() if progress else None  # None: it never began
        if isinstance(exc, KeyboardInterrupt | GeneratorExit):
            self.result.interrupted = True
            self.store(True)

    def store(self, interrupted: bool) -> list[str]:
        """Store the answer with the ids it was generated as (all of them, thinking included:
        the rendering uses them only where they spell the stored answer), then the snapshot
        (when the engine began). Returns the snapshot's warnings."""
        chat, began = self.chat, self.plan is not None
        stats = self.result.stats or Stats(0, 0, 0, 0.0, 0.0)
        generated = list(self.rt.engine.progress.generated) if began else []
        return chat.store_answer(self.splitter.answer, self.splitter.think or None, stats,
                                 interrupted, generated, snapshot=began)  # fmt: skip


def _tokens(n: int) -> str:
    return f"{n:,} token" + ("" if n == 1 else "s")


def cut_line(fitted: Any, plan: Plan) -> str:
    """The notice for a prefill that cuts the cache back: where (the turn and role of the
    message it falls in, from the rendering `fitted`) and how much is recomputed."""
    msgs, _, starts, _ = fitted
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

