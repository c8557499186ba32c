"""The server's side of a conversation: one model answering chat requests one at a time, in
arrival order, each from the longest prefix of its ids found in memory or in the K/V pool.

A `Worker` owns the loaded model (a handle.Runtime) and one thread that answers `Job`s from a
bounded queue (`submit` raises `Busy` when it is full). For each job it renders the messages
with the model's chat template as the REPL does (prompt.Prompt; an answer this server generated
is rendered as the ids it was generated as), brings the engine's cache to the longest prefix
found in memory or on disk (the pool the REPL's sessions share, kvstore.KVStore), streams the
answer (thinking split off, cut at the request's stop strings), then saves what it computed
into the pool, and posts what happened through the job's `post` callback as small items:
`Started`, `Piece`..., `Answered`; or `Refused` / `Failed`. A job cancelled (its client went
away) closes the engine's stream, which leaves the cache matching its ids.

Never: HTTP (server.py), SQL, printing. A request names no file: the pool's folders come from
the model's fingerprint and one fixed list name (`SERVER_LIST`).
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kvrepl.chat.prompt import ThinkSplitter
from kvrepl.chat.snapshots import Snapshots
from kvrepl.chat.thinkbudget import think_budget
from kvrepl.config import Settings
from kvrepl.context import check_fits
from kvrepl.errors import KvreplError, PromptError, SnapshotError
from kvrepl.events import Finish, Stats, TextDelta, ThinkDelta

if TYPE_CHECKING:
    from kvrepl.chat.handle import Runtime
    from kvrepl.engine.engine import Sampling
    from kvrepl.store.kvstore import KVStore

# The pool's list of the chunks this server used (kvbook's per-session list): `kvrepl rm` of a
# session then leaves the chunks the server shares with it.
SERVER_LIST = "http-server"
REMEMBERED = 256  # answers whose generated ids are kept (by their text) for the next request


@dataclass(frozen=True)
class Ask:
    """One chat request, checked: messages as {role, content}, and the sampling it overrides
    (None: the server's settings)."""

    messages: list[dict[str, str]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refused:
    """The request cannot be answered as it is (400: the reason), or not now (503)."""

    status: int
    message: str


@dataclass(frozen=True)
class Started:
    """The prompt is rendered and fits: the answer follows."""

    prompt_tokens: int


@dataclass(frozen=True)
class Piece:
    """A piece of the answer's text, or of its thinking."""

    text: str
    think: bool = False


@dataclass(frozen=True)
class Answered:
    """The answer is whole and its K/V saved. `number`: this server's n-th answer."""

    finish_reason: str
    prompt_tokens: int
    stats: Stats
    from_disk: int  # of the reused tokens, those read from the pool
    queued_s: float
    number: int
    notes: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """kvrepl's own figures of the answer."""
        s = self.stats
        from_memory = s.reused_tokens - self.from_disk
        source = {(False, False): "none", (True, False): "memory", (False, True): "disk",
                  (True, True): "memory+disk"}[(from_memory > 0, self.from_disk > 0)]  # fmt: skip
        return {**s.as_dict(), **s.draft_dict(), "reused_from_memory": from_memory,
                "reused_from_disk": self.from_disk, "source": source,
                "queued_s": round(self.queued_s, 4), "answer": self.number,
                "notes": self.notes}  # fmt: skip


@dataclass(frozen=True)
class Failed:
    """Something broke inside the server (500); the model's cache is consistent again."""

    message: str


Item = Refused | Started | Piece | Answered | Failed


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    """A request in the queue, and how its items reach the client (`post`, from the model's
    thread). `cancel` (the client went away) stops it at the next token."""

    ask: Ask
    post: Callable[[Item], None]
    received: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """The model and its thread: jobs answered one at a time, at most `queue_size` waiting."""

    def __init__(self, runtime: Runtime, settings: Settings, kv: KVStore,
                 queue_size: int) -> None:  # fmt: skip
        self.rt, self.settings, self.kv = runtime, settings, kv
        self.snapshots = Snapshots(lambda: kv)
        self.fingerprint = runtime.loaded.fingerprint
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, queue_size))
        self._current: Job | None = None
        self._closing = False
        self._answers: OrderedDict[str, list[int]] = OrderedDict()
        self.answered = 0
        self.cancelled = 0  # jobs ended by their client going away
        self._thread = threading.Thread(target=self._run, name="kvrepl-model", daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        return self

    def submit(self, ask: Ask, post: Callable[[Item], None]) -> Job:
        """Queue a request; Busy when the queue is full (or the server is closing)."""
        job = Job(ask, post)
        if self._closing:
            raise Busy("the server is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._jobs.maxsize} requests are waiting already") from None
        return job

    def status(self) -> dict[str, Any]:
        return {"answering": self._current is not None, "waiting": self._jobs.qsize(),
                "queue_size": self._jobs.maxsize, "answered": self.answered,
                "cancelled": self.cancelled,
                "cached_tokens": self.rt.engine.cached_tokens}  # fmt: skip

    def close(self, timeout: float = 60) -> None:
        """Stop after the job in hand (cancelled: it saves what it computed); the jobs left are
        refused. Once: a second call returns at once."""
        if self._closing:
            return
        self._closing = True
        if (job := self._current) is not None:
            job.cancel()
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._current = job
            try:
                self._answer(job)
            except KvreplError as exc:
                job.post(Failed(str(exc)))
            except Exception as exc:  # a bug: one line to the client, the traceback to the log
                traceback.print_exc()
                job.post(Failed(f"internal error: {type(exc).__name__}: {exc}"))
            finally:
                self._current = None

    # -- one job ------------------------------------------------------------------------------
    def _answer(self, job: Job) -> None:
        started = time.perf_counter()
        if job.cancelled.is_set():
            self.cancelled += 1
            return
        if self._closing:
            job.post(Refused(503, "the server is shutting down"))
            return
        try:
            ids = self._render(job.ask.messages)
        except PromptError as exc:
            job.post(Refused(400, str(exc)))
            return
        from_disk, notes = self._bring(ids)
        job.post(Started(len(ids)))
        reason, text = self._generate(job, ids, started)
        stats = self.rt.engine.progress.stats()
        notes += self._save(len(ids))
        if reason is None:
            self.cancelled += 1
            return
        generated = list(self.rt.engine.progress.generated)
        if reason != "stop string":
            self._remember(text, generated)
        self.answered += 1
        finish = "stop" if reason == "stop string" else reason
        job.post(Answered(finish, len(ids), stats, min(from_disk, stats.reused_tokens),
                          started - job.received, self.answered, notes))  # fmt: skip

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages' ids, as the REPL renders a conversation (the settings' system prompt
        first when the request has none; an answer this server gave as its own ids); a
        PromptError when they cannot fit the context with room for an answer."""
        msgs: list[dict[str, Any]] = [dict(m) for m in messages]
        if self.settings.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.settings.system})
        for m in msgs:
            if m["role"] == "assistant" and (known := self._answers.get(m["content"])):
                m["ids"] = known  # used only where they decode to the content (Prompt._own_ids)
        ids = self.rt.prompt.render(msgs, enable_thinking=self.settings.thinking)
        check_fits("request", len(ids), self.rt.engine.context_length)  # the REPL's rule
        return ids

    def _bring(self, ids: list[int]) -> tuple[int, list[str]]:
        """Bring the cache to the longest prefix of `ids` in memory or in the pool (the pool's
        when it holds at least snapshots.MIN_GAIN tokens more, as in the REPL). Returns
        how many tokens came from disk, and what the pool had to say."""
        engine = self.rt.engine
        if not engine.reuse or not engine.can_cut or len(ids) < 2:
            return 0, []
        result = self.snapshots.from_pool(engine, self.fingerprint, ids)
        if result is None:
            return 0, []
        notes = engine.restore(result)
        return max(0, engine.cached_tokens - result.start), notes

    def _generate(self, job: Job, ids: list[int], started: float) -> tuple[str | None, str]:
        """Stream the answer to the job; why it ended ("stop", "length", "stop string", or None
        when the job was cancelled) and its text."""
        rt = self.rt
        splitter = ThinkSplitter(in_think=rt.prompt.opens_in_think(ids))
        stops = StopText(job.ask.stop)
        reason: str | None = None
        budget = think_budget(self.settings.think_budget, rt.prompt, splitter.in_think)
        events = rt.engine.stream(ids, self._sampling(job.ask), started=started, steer=budget)
        try:
            for event in events:
                if job.cancelled.is_set():
                    return None, stops.text
                if isinstance(event, TextDelta) and _pass(job, splitter.feed(event.text), stops):
                    return "stop string", stops.text
                if isinstance(event, Finish):
                    reason = event.reason
        finally:
            events.close()  # the engine cuts its cache back to what it computed
        if _pass(job, splitter.flush(), stops):
            return "stop string", stops.text
        if tail := stops.flush():
            job.post(Piece(tail))
        return reason, stops.text

    def _sampling(self, ask: Ask) -> Sampling:
        from kvrepl.engine.engine import Sampling

        given = {"temperature": ask.temperature, "top_p": ask.top_p,
                 "max_tokens": ask.max_tokens, "seed": ask.seed}  # fmt: skip
        base = Sampling.from_settings(self.settings)
        return replace(base, **{k: v for k, v in given.items() if v is not None})

    def _save(self, prompt_tokens: int) -> list[str]:
        """Write what is new in the cache to the pool, in two chunks: the prompt, then the
        answer. A client sends an answer back as text, which may tokenize otherwise than it was
        generated: the prompt's chunk is found whole, and the answer's up to where the two
        tokenizations part (kvstore.find_within)."""
        engine = self.rt.engine
        if not engine.can_cut or not engine.cached_tokens:
            return []
        self.kv.budget = self.settings.kv_budget_mb << 20
        ids, layers = engine.export()
        cut = min(prompt_tokens, len(ids))
        try:
            if cut < len(ids):
                head = [(k[:, :, :cut], v[:, :, :cut]) for k, v in layers]
                self.kv.save(SERVER_LIST, ids[:cut], head, self.fingerprint)
            self.kv.save(SERVER_LIST, ids, layers, self.fingerprint)
        except (SnapshotError, OSError, ValueError) as exc:
            return [f"warning: {exc}"]
        return []

    def _remember(self, text: str, generated: list[int]) -> None:
        """Keep the ids an answer was generated as, by its text: when a client sends the answer
        back, it is rendered as these ids, and its K/V is found in the cache."""
        if not text or not generated:
            return
        self._answers[text] = generated
        self._answers.move_to_end(text)
        while len(self._answers) > REMEMBERED:
            self._answers.popitem(last=False)


def _pass(job: Job, pieces: Iterable[TextDelta | ThinkDelta], stops: StopText) -> bool:
    """Post the splitter's pieces (the answer's through the stop strings); True when one of
    them reached a stop string."""
    for piece in pieces:
        if isinstance(piece, ThinkDelta):
            job.post(Piece(piece.text, think=True))
            continue
        text, hit = stops.feed(piece.text)
        if text:
            job.post(Piece(text))
        if hit:
            return True
    return False


class StopText:
    """Answer text up to the first of some stop strings, fed in pieces: text that may begin a
    stop string is held back until the next piece tells. `text` is what was let through."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.text = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text let through, and whether a stop string was reached (nothing more passes)."""
        buf = self._held + piece
        hits = [at for s in self.stops if (at := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            return self._through(buf[: min(hits)]), True
        keep = max((_partial_suffix(buf, s) for s in self.stops), default=0)
        self._held = buf[len(buf) - keep :]
        return self._through(buf[: len(buf) - keep]), False

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        held, self._held = self._held, ""
        return self._through(held)

    def _through(self, text: str) -> str:
        self.text += text
        return text


def _partial_suffix(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
