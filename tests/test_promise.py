"""The promise, where users stand: greedy output with cache reuse equals `--no-reuse`, after every
operation a user can make, on every model and backend kvrepl runs.

One scenario runs twice through the Conversation API (kvrepl/chat/conversation.py, as the REPL
reaches it): a conversation that reuses its cache and one that recomputes every turn (`--no-reuse`),
each in its own store. Turns, an edit, a retry, an undo, /branch to the first branch and back (its
K/V come back from disk), a resume by a new kvrepl process, Ctrl-C in the engine and at the screen.
After every step both hold the same messages, every answer as the same ids; the cache reuse is seen
to happen (or the comparison proves nothing); and on a fast path, whose kernels are
batch-invariant, bit for bit: the logits of the prompt's end (reached over the reused cache, and
from nothing by --no-reuse) and of each step of the answer, and the reuse run's cache against a
recomputation of its ids from nothing (the K and V of every layer, the last position's logits).

A model or backend joins with one line in CASES: how the test gets the model (loaded once per
test session or module), whether it is compared bit for bit, and how a kvrepl process loads the
same model (None: a new Conversation over the same store stands in for the new process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import close_conversation, open_conversation
from makers import make_tiny_model, make_tokenizer
from procs import Kvrepl

from kvrepl.backends.protocol import KernelBackend
from kvrepl.chat.conversation import Conversation
from kvrepl.chat.turn import Turn
from kvrepl.config import Settings
from kvrepl.engine import models
from kvrepl.engine.engine import Engine
from kvrepl.engine.models import LoadedModel
from kvrepl.engine.plan import common_prefix
from kvrepl.engine.sampler import Sampler
from kvrepl.events import TextDelta
from kvrepl.store.kvstore import KVStore

MAX_TOKENS = 12
SETTINGS = Settings(temperature=0.0, repetition_penalty=1.0, max_tokens=MAX_TOKENS)
FLAGS = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", str(MAX_TOKENS)]


# ---------------------------------------------------------------------------------------------
# the models


@dataclass(frozen=True)
class Case:
    """One model on one backend. `load(request)` gives the LoadedModel; `exact`: a fast path,
    compared bit for bit (else token for token); `argv`: the flags that make a kvrepl process
    load the same model (`MODEL` stands for its file or folder; None: no process, a new
    Conversation stands in for it)."""

    name: str
    load: Callable[[pytest.FixtureRequest], LoadedModel]
    exact: bool
    argv: tuple[str, ...] | None


MODEL = "--model={path}"
F32 = "--dtype=float32"


def fixture(name: str) -> Callable[[pytest.FixtureRequest], LoadedModel]:
    """A model that conftest loads once per test session."""
    return lambda request: request.getfixturevalue(name)


def tiny(make: Callable[[Any], Any], dtype: str = "auto") -> Callable[..., LoadedModel]:
    """A tiny random model (`make(tokenizer)`), saved as a model folder and loaded as kvrepl
    loads one (`dtype` auto on the CPU: its fast path, converted to Q8_0), once per module."""

    def load(request: pytest.FixtureRequest) -> LoadedModel:
        folder = request.getfixturevalue("tmp_path_factory").mktemp("model") / "tiny"
        tok = make_tokenizer()
        make(tok).save_pretrained(folder)
        tok.save_pretrained(folder)
        return models.load(str(folder), device="cpu", dtype=dtype, progress=False)

    return load


def untied_llama(tok: Any) -> Any:
    """The tiny Llama, untied: its greedy answers vary (the tied one repeats a token)."""
    return make_tiny_model(len(tok), seed=1, tied=False)


CASES = [
    Case("smollm2-fast", fixture("real"), exact=True, argv=()),
    Case("smollm2-fast-kv8", fixture("real8"), exact=True, argv=("--kv-bits=8",)),
    Case("smollm2-float32", fixture("real32"), exact=False, argv=(F32,)),
    Case("gemma3-270m-fast", fixture("gemma"), exact=True, argv=(MODEL,)),
    Case("tiny-llama-fast", tiny(untied_llama), exact=True, argv=(MODEL,)),
    Case("tiny-llama-float32", tiny(untied_llama, "float32"), exact=False, argv=(MODEL, F32)),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> tuple[Case, LoadedModel]:
    c: Case = request.param
    loaded = c.load(request)
    exact = batch_invariant(loaded.model)
    assert exact == c.exact, f"{c.name}: loaded {'a' if exact else 'no'} fast path {loaded.notes}"
    return c, loaded


def batch_invariant(model: Any) -> bool:
    """Whether a backend's kernels are batch-invariant (kvrepl's: the fast paths)."""
    return isinstance(model, KernelBackend) and model.batch_invariant


# ---------------------------------------------------------------------------------------------
# one side of the comparison


@dataclass
class Side:
    """A conversation over its own store, reusing its cache or not (`--no-reuse`). `logits`:
    what each forward of its engine's runner returned, by the position it ended at (reset at
    every step); `marks`: leaf message ids by name."""

    loaded: LoadedModel
    home: Path
    reuse: bool
    chat: Conversation = field(init=False)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    open_now: bool = False

    def __post_init__(self) -> None:
        self.open()

    def open(self) -> None:
        """A Conversation with a new engine (an empty cache, as in a new process)."""
        settings = dataclasses.replace(SETTINGS, reuse=self.reuse)
        self.chat = open_conversation(self.loaded, self.home, settings)
        self.open_now = True
        runner = self.engine.runner
        forward = runner.forward

        def recording(ids: list[int], pc: Any) -> torch.Tensor:
            logits = forward(ids, pc)
            self.logits[len(pc.ids) + len(ids)] = logits.detach().clone()  # ids join after
            return logits

        runner.forward = recording

    def close(self) -> None:
        if self.open_now:
            close_conversation(self.chat)
            self.open_now = False

    @property
    def sid(self) -> str:
        assert self.chat.session is not None
        return self.chat.session.id

    @property
    def engine(self) -> Engine:
        return self.chat.model.get().engine

    def transcript(self) -> list[tuple[str, str, tuple[int, ...] | None, bool]]:
        return [(m.role, m.content, m.token_ids, m.interrupted) for m in self.chat.history()]


@dataclass
class Outcome:
    """What a step did on one side: the turn's result, or None (nothing computed)."""

    turn: Turn | None
    texts: list[str] = field(default_factory=list)


def answer(turn: Turn, *, ctrl_c_after: int | None = None, in_engine: bool = False) -> Outcome:
    """Run a turn as the REPL does (`Turn.run`). With `ctrl_c_after` n, Ctrl-C comes after the
    nth piece of text: at the screen (raised by the callback: the turn is closed where it
    waits), or `in_engine`: raised inside the engine's work, the next time it chooses a token
    (the token just shown fed, with any drafts after it)."""
    texts: list[str] = []
    ctrl_c = CtrlC()

    def on_event(event: Any) -> None:
        if isinstance(event, TextDelta):
            texts.append(event.text)
            if len(texts) == ctrl_c_after:
                if not in_engine:
                    raise KeyboardInterrupt
                ctrl_c.armed = True

    with ctrl_c:
        turn.run(on_event)
    if ctrl_c_after is not None:
        assert turn.result.interrupted and len(texts) == ctrl_c_after, texts
        assert ctrl_c.fired == in_engine, "the answer ended before the engine chose a token"
    return Outcome(turn, texts)


class CtrlC:
    """While entered: once `armed`, the engine's next choice of a token (the sampler, asked
    after every forward whatever fed it) raises KeyboardInterrupt, as a Ctrl-C landing there."""

    def __init__(self) -> None:
        self.armed = self.fired = False
        self._original = Sampler.next_tensor

    def __enter__(self) -> CtrlC:
        original, ctrl_c = self._original, self

        def next_tensor(sampler: Sampler, logits: torch.Tensor) -> torch.Tensor:
            if ctrl_c.armed:
                ctrl_c.armed, ctrl_c.fired = False, True
                raise KeyboardInterrupt
            return original(sampler, logits)

        Sampler.next_tensor = next_tensor  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Sampler.next_tensor = self._original  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# the steps: each does one operation on one side


Step = Callable[[Side], Outcome]


def send(text: str, mark: str | None = None) -> Step:
    def step(side: Side) -> Outcome:
        out = answer(side.chat.send(text))
        if mark:
            side.marks[mark] = side.chat.history()[-1].id
        return out

    return step


def edit(n: int, text: str) -> Step:
    return lambda side: answer(side.chat.edit(n, text))


def retry() -> Step:
    return lambda side: answer(side.chat.retry())


def undo() -> Step:
    def step(side: Side) -> Outcome:
        side.chat.undo()
        return Outcome(None)

    return step


def branch(mark: str) -> Step:
    def step(side: Side) -> Outcome:
        side.chat.switch_branch(side.marks[mark])
        return Outcome(None)

    return step


def ctrl_c(text: str, after: int, in_engine: bool) -> Step:
    return lambda side: answer(side.chat.send(text), ctrl_c_after=after, in_engine=in_engine)


def resume(side: Side) -> Outcome:
    """Stands for the resume (run_resume: both sides at once, in new processes)."""
    raise AssertionError("run_resume runs the resume")


# (name, the step, what the reuse side's turn must show it reused: "none"; "some": all the
# cache held that the prompt shares; "one fed": all but the last token; "from disk": the
# branch's K/V restored from the pool; "resumed": the session's snapshot restored)
SCENARIO: list[tuple[str, Step, str]] = [
    ("turn 1", send("What is the capital of France? Answer in one sentence."), "none"),
    ("turn 2", send("And of Italy?", mark="first"), "some"),
    ("edit turn 1", edit(1, "What is the capital of Spain? Answer in one sentence."), "some"),
    ("a turn on the edit", send("Name a colour of the rainbow."), "some"),
    ("undo", undo(), ""),
    ("a turn after the undo", send("Say just the word yes.", mark="edited"), "some"),
    ("retry", retry(), "one fed"),
    ("/branch to the first branch", branch("first"), ""),
    ("a turn on the first branch", send("And of Germany?"), "from disk"),
    ("/branch back to the edit", branch("edited"), ""),
    ("a turn back on the edit", send("Thanks! Now in one word: why?"), "from disk"),
    ("resume in a new process", resume, "resumed"),
    ("Ctrl-C in the engine", ctrl_c("Write a short poem about the sea.", 3, True), "resumed"),
    ("Ctrl-C at the screen", ctrl_c("Go on, count from one to ten.", 2, False), "some"),
]


# ---------------------------------------------------------------------------------------------
# the checks


@torch.inference_mode()
def recompute(loaded: LoadedModel, ids: list[int]) -> tuple[torch.Tensor, list[Any]]:
    """The last logits and every layer's (K, V) of `ids`, computed from nothing."""
    engine = Engine(loaded.model, loaded.tokenizer, end_ids=set(),
                    context_length=loaded.context_length, reuse=False)  # fmt: skip
    logits = engine.prefill(ids).clone()
    return logits, [(k.clone(), v.clone()) for k, v in engine.pc.export()]


def assert_bitwise(where: str, layers: list[Any], want: list[Any]) -> None:
    assert len(layers) == len(want), where
    for i, ((k, v), (wk, wv)) in enumerate(zip(layers, want, strict=True)):
        assert torch.equal(k, wk), f"{where}: layer {i} keys differ from a recomputation"
        assert torch.equal(v, wv), f"{where}: layer {i} values differ from a recomputation"


def check_reuse(name: str, kind: str, reuse: Outcome, fresh: Outcome, before: list[int],
                after: list[int]) -> None:  # fmt: skip
    """The reuse side reused what it should (else the comparison proves nothing): `before` and
    `after` are its cache's ids around the turn. The --no-reuse side reused nothing."""
    assert reuse.turn is not None and fresh.turn is not None
    a, b = reuse.turn.result, fresh.turn.result
    assert a.stats is not None and b.stats is not None, name
    assert b.stats.reused_tokens == 0, f"{name}: --no-reuse reused {b.stats.reused_tokens}"
    reused = a.stats.reused_tokens
    prompt = after[: reused + a.stats.prefilled_tokens]
    if kind == "none":
        assert reused == 0, name
    elif kind in ("some", "one fed"):
        assert 0 < reused == min(common_prefix(before, prompt), len(prompt) - 1), (name, a.stats)
        assert kind == "some" or a.stats.prefilled_tokens == 1, (name, a.stats)
    else:
        assert reused > 0, f"{name}: reused nothing ({a.notes})"
    said = {"from disk": "tokens of this branch from disk", "resumed": "cached tokens from disk"}
    if kind in said:
        assert any("restored" in n and said[kind] in n for n in a.notes), (name, a.notes)


@torch.inference_mode()
def check_caches(name: str, loaded: LoadedModel, exact: bool, reuse: Side, fresh: Side,
                 prompt: int) -> None:  # fmt: skip
    """Both caches hold the same ids. On a fast path, bit for bit: the logits both sides'
    forwards gave at the same positions (the prompt's end, which the reuse side reached over its
    cache and --no-reuse from nothing, and the answer's steps); the K/V of both caches and the
    last logits the reuse side's cache gives, against a recomputation of its ids from nothing."""
    a, b = reuse.engine, fresh.engine
    a.pc.check()
    b.pc.check()
    assert a.pc.ids == b.pc.ids, f"{name}: the caches hold other ids"
    if not exact:
        return
    both = sorted(reuse.logits.keys() & fresh.logits.keys())
    assert prompt in both, (name, prompt, both)
    for end in both:
        assert torch.equal(reuse.logits[end], fresh.logits[end]), f"{name}: logits at {end}"
    want_logits, want_kv = recompute(loaded, list(a.pc.ids))
    assert_bitwise(f"{name}, reuse", a.pc.export(), want_kv)
    assert_bitwise(f"{name}, --no-reuse", b.pc.export(), want_kv)
    # The logits its cache gives the last position (feeding it again, the product's way: the
    # rest is reused), checked after its K/V, which this recomputes.
    got = a.prefill(list(a.pc.ids))
    assert (a.progress.reused, a.progress.prefilled) == (len(a.pc.ids) - 1, 1)
    assert torch.equal(got, want_logits), f"{name}: logits differ from a recomputation"


def run_step(name: str, step: Step, kind: str, c: Case, loaded: LoadedModel,
             sides: tuple[Side, Side]) -> None:  # fmt: skip
    """One step on both sides, then every check: the same conversation, the same answers, the
    reuse seen, the caches."""
    reuse, fresh = sides
    before = list(reuse.engine.pc.ids)
    for side in sides:
        side.logits.clear()
    outcomes = (step(reuse), step(fresh))
    assert reuse.transcript() == fresh.transcript(), f"{name}: the conversations differ"
    if outcomes[0].turn is None:
        return
    assert outcomes[0].texts == outcomes[1].texts, name
    stats = outcomes[1].turn.result.stats  # type: ignore[union-attr]
    assert stats is not None, name
    check_reuse(name, kind, *outcomes, before, list(reuse.engine.pc.ids))
    check_caches(name, loaded, c.exact, reuse, fresh, stats.prefilled_tokens)


def run_resume(c: Case, loaded: LoadedModel, sides: tuple[Side, Side], text: str) -> None:
    """Resume both stores in a new kvrepl process each (`--resume`; the other `--no-reuse`),
    side by side (without a process for this model, in a new Conversation each). Then both sides
    open new Conversations over their stores, so the next turn also starts from the disk."""
    if c.argv is None:
        reopen(sides)
        run_step("resume in a new Conversation", send(text), "resumed", c, loaded, sides)
    else:
        for side in sides:
            side.close()
        model = [a.format(path=loaded.source.path) for a in c.argv]
        argv = ["--resume", *model, *FLAGS]
        procs = [Kvrepl(argv if side.reuse else [*argv, "--no-reuse"], home=side.home,
                        stdin=text + "\n") for side in sides]  # fmt: skip
        reuse_run, fresh_run = (p.finish(600) for p in procs)
        for run in (reuse_run, fresh_run):
            assert run.rc == 0, run.err
        assert "snapshot: restored " in reuse_run.err, reuse_run.err
        ((reused, _, _),) = reuse_run.stats()
        ((none, _, _),) = fresh_run.stats()
        assert reused > 0 and none == 0, (reuse_run.err, fresh_run.err)
    reopen(sides)
    reuse, fresh = sides
    assert reuse.transcript() == fresh.transcript(), "resume: the conversations differ"
    assert reuse.transcript()[-1][0] == "assistant"
    if c.exact:  # what each side left on disk is a recomputation of its ids
        for side in sides:
            snap = KVStore(side.home / "kv").load_session(side.sid, loaded.fingerprint)
            assert snap.notes == [] and snap.ids, snap.notes
            assert_bitwise(f"resume, the snapshot of {side.home.name}", snap.layers,
                           recompute(loaded, snap.ids)[1])  # fmt: skip


def reopen(sides: tuple[Side, Side]) -> None:
    """Each side's Conversation closed, and a new one (a new engine) on its latest session."""
    for side in sides:
        side.close()
        side.open()
        side.chat.sessions.resume_latest()


# ---------------------------------------------------------------------------------------------
# the test


@pytest.mark.model
def test_reuse_equals_no_reuse_after_every_step(case, tmp_path):
    c, loaded = case
    sides = (Side(loaded, tmp_path / "reuse", True), Side(loaded, tmp_path / "no-reuse", False))
    try:
        for name, step, kind in SCENARIO:
            if step is resume:
                run_resume(c, loaded, sides, "Say goodbye in French.")
                continue
            run_step(name, step, kind, c, loaded, sides)
            if name == "turn 1":  # a model that repeats itself would prove nothing
                ids = sides[0].chat.history()[-1].token_ids or ()
                assert len(set(ids)) >= 3, f"the answer repeats itself: {ids}"
    finally:
        for side in sides:
            side.close()
