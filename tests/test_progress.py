"""A long prefill shows its progress (issue "Fits the shell and the user's machine"): the engine
yields a `Progress` between prefill chunks, the conversation passes it on, and the terminal
renderer shows one transient line once a prefill has run about a second, gone when the answer
starts; plain (piped) output shows nothing of it."""

from __future__ import annotations

import torch
from helpers import make_harness, render_events, tiny_loaded
from test_render import (
    STATS,
    STATS_LINE,
    output,
    plain_console,
    screen_of,
    split_stats,
    tty_console,
)

from kvrepl.app.renderers import make_renderer
from kvrepl.app.turnlines import PROGRESS_AFTER_S, format_progress
from kvrepl.chat.turn import Result
from kvrepl.config import Settings
from kvrepl.engine.engine import Engine, Sampling
from kvrepl.events import Finish, Plan, Progress, TextDelta, ThinkDelta

GREEDY = Sampling(temperature=0, max_tokens=3)
LINE = "prefill 1,536 / 5,600 tokens · 240 tok/s · 17 s left"
EARLY = Progress(512, 5600, PROGRESS_AFTER_S / 2)
LATE = Progress(1536, 5600, 6.4)  # 240 tok/s, 4,064 tokens left: 17 s


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 380, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(tiny, chunk_size: int = 4) -> Engine:
    model, tok = tiny
    return Engine(model, tok, end_ids=set(), context_length=512, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# the engine and the conversation


def test_the_engine_yields_progress_between_prefill_chunks_then_the_answer(tiny):
    e = engine(tiny)
    events = list(e.stream(random_ids(10), GREEDY))
    progress = [ev for ev in events if isinstance(ev, Progress)]
    assert [(p.done, p.total) for p in progress] == [(4, 10), (8, 10)]  # none after the last
    assert isinstance(events[0], Plan) and events[1:3] == progress  # the plan, then the chunks
    assert 0 <= progress[0].elapsed_s <= progress[1].elapsed_s
    assert isinstance(events[-2], Finish) and events[-1].prefilled_tokens == 10
    # The next turn counts only what it computes: the cache covers the rest.
    more = e.pc.ids + random_ids(6, seed=1)
    events = list(e.stream(more, GREEDY))
    assert [(ev.done, ev.total) for ev in events if isinstance(ev, Progress)] == [(4, 6)]


def test_a_prompt_of_one_chunk_yields_no_progress(tiny):
    events = list(engine(tiny, chunk_size=512).stream(random_ids(40), GREEDY))
    assert not [ev for ev in events if isinstance(ev, Progress)]


def test_stopping_at_a_progress_event_leaves_the_cache_at_what_was_computed(tiny):
    """Ctrl-C while the progress line is up: the consumer closes the stream there."""
    e = engine(tiny)
    ids = random_ids(10)
    stream = e.stream(ids, GREEDY)
    assert next(stream) == Plan(0, 10, 0, "empty")  # said before computing
    first = next(stream)
    assert isinstance(first, Progress) and (first.done, first.total) == (4, 10)
    stream.close()
    assert e.pc.ids == ids[:4] and e.progress.prefilled == 4
    e.pc.check()
    assert e.align(ids).keep == 4  # the next turn starts from there ...
    events = list(e.stream(ids, GREEDY))
    assert (events[-1].reused_tokens, events[-1].prefilled_tokens) == (4, 6)  # ... and does


def test_the_conversation_passes_progress_on_and_plain_output_shows_none(tmp_path, tiny):
    # A repetition penalty: the tied tiny model would otherwise only repeat its last token.
    settings = Settings(temperature=0.0, max_tokens=6, repetition_penalty=3.0)
    h = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=settings)
    try:
        h.rt.engine.chunk_size = 4
        events = list(h.chat.send("The capital of France is Paris. Hello there"))
        kinds = [type(ev) for ev in events]
        assert Progress in kinds and TextDelta in kinds
        assert kinds.index(TextDelta) > max(i for i, k in enumerate(kinds) if k is Progress)
        out = h.run("How are you? The capital of France is Paris.")
        assert "prefill " not in out and h.last_stats.prefilled_tokens > 4
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# the renderer


def test_format_progress():
    assert format_progress(LATE) == LINE
    assert format_progress(Progress(0, 10, 0.0)) == "prefill 0 / 10 tokens"


def test_the_line_shows_past_a_second_and_goes_when_the_answer_starts():
    console = tty_console()
    renderer = make_renderer(console, refresh_interval=0)
    renderer.begin()
    renderer.feed(EARLY)
    assert output(console) == ""  # under a second: nothing
    renderer.feed(LATE)
    assert screen_of(console) == LINE
    renderer.feed(TextDelta("Hello there."))
    assert screen_of(console) == "Hello there."  # the answer took its place
    renderer.end(Result(stats=STATS, finish_reason="stop"))
    assert split_stats(screen_of(console)) == ("Hello there.", STATS_LINE)


def test_thinking_also_takes_the_lines_place():
    console = tty_console()
    renderer = make_renderer(console, refresh_interval=0)
    renderer.begin()
    renderer.feed(LATE)
    renderer.feed(ThinkDelta("hmm"))
    assert "prefill " not in screen_of(console) and "thinking" in screen_of(console)
    renderer.feed(Progress(5000, 5600, 20.0))  # cannot come back once the answer is under way
    assert "prefill " not in screen_of(console)
    renderer.end()


def test_ctrl_c_during_the_prefill_leaves_only_the_stats_line():
    console = tty_console()
    renderer = make_renderer(console, refresh_interval=0)
    renderer.begin()
    renderer.feed(LATE)
    renderer.end(Result(stats=STATS, interrupted=True))
    assert split_stats(screen_of(console)) == ("", f"{STATS_LINE} · interrupted")


def test_plain_output_never_shows_progress():
    console = plain_console()
    render_events(make_renderer(console), [EARLY, LATE, TextDelta("Hi."), Finish("stop"), STATS])
    assert output(console) == f"Hi.\n{STATS_LINE}\n"
    err, out = plain_console(), plain_console()
    render_events(make_renderer(out, err=err), [LATE, TextDelta("Hi."), Finish("stop"), STATS])
    assert (output(out), output(err)) == ("Hi.\n", f"{STATS_LINE}\n")
