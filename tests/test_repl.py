"""The REPL driven through prompt-toolkit's pipe input (keys as a terminal sends them), Ctrl-C
during generation, completion, and kvrepl run with piped stdin (no prompt-toolkit, no ANSI)."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Harness, lines_of, make_harness, stats_lines, tiny_loaded
from procs import run_kvrepl
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from kvrepl.app.keys import SlashCompleter
from kvrepl.app.repl import interactive_loop, stdin_lines
from kvrepl.app.turnlines import format_stats
from kvrepl.config import SESSION_KEYS, Settings
from kvrepl.events import Notice, TextDelta

SETTINGS = Settings(temperature=0.0, max_tokens=6, repetition_penalty=3.0)
CTRL_C, CTRL_D, ENTER, ALT_ENTER, UP = "\x03", "\x04", "\r", "\x1b\r", "\x1b[A"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def h(tmp_path: Path, tiny) -> Iterator[Harness]:
    harness = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=SETTINGS,
                           interactive=True)  # fmt: skip
    yield harness
    harness.close()


def drive(h: Harness, *keys: str) -> int:
    """Type `keys` into the interactive loop, then Ctrl-D; returns the loop's exit code."""
    with create_pipe_input() as pipe:
        for k in keys:
            pipe.send_text(k)
        pipe.send_text(CTRL_D)
        return interactive_loop(
            h.repl, h.home, toolbar=lambda: "toolbar", input=pipe, output=DummyOutput()
        )


def user_texts(h: Harness) -> list[str]:
    return [m.content for m in h.chat.sessions.user_turns()]


# ---------------------------------------------------------------------------------------------
# the interactive loop through a pipe


def test_a_message_and_a_command_then_ctrl_d(h: Harness):
    assert drive(h, "hello there" + ENTER, "/history" + ENTER) == 0
    out = h.text()
    assert len(stats_lines(out)) == 1
    assert "[1. you] hello there" in out
    answer = h.chat.history()[-1]
    assert answer.role == "assistant" and f"[assistant] {answer.content}" in out
    assert user_texts(h) == ["hello there"]


def test_ctrl_c_at_the_prompt_clears_the_line(h: Harness):
    assert drive(h, "never sent" + CTRL_C, "hello there" + ENTER) == 0
    assert user_texts(h) == ["hello there"]
    assert "never sent" not in (h.home / "history").read_text()
    assert len(stats_lines(h.text())) == 1


@pytest.mark.parametrize("word", ["q", "/quit", "/exit", "/q"])
def test_quit_words_end_the_loop(h: Harness, word):
    assert drive(h, word + ENTER, "never sent" + ENTER) == 0
    assert h.chat.session is None and h.calls == []


def test_ctrl_d_on_an_empty_prompt_quits_at_once(h: Harness):
    assert drive(h) == 0
    assert h.calls == [] and h.text() == ""


def test_a_bracketed_paste_stays_one_message(h: Harness):
    drive(h, "\x1b[200~line one\nline two\nline three\x1b[201~" + ENTER)
    assert user_texts(h) == ["line one\nline two\nline three"]
    assert len(stats_lines(h.text())) == 1


def test_a_pasted_slash_line_with_newlines_is_not_split(h: Harness):
    drive(h, "hello there" + ENTER, "\x1b[200~/edit 1 first\nsecond\x1b[201~" + ENTER)
    assert user_texts(h) == ["first\nsecond"]


def test_alt_enter_and_ctrl_j_insert_a_newline(h: Harness):
    drive(h, "x" + ALT_ENTER + "y" + ENTER, "a\nb" + ENTER)  # "\n" is Ctrl-J
    assert user_texts(h) == ["x\ny", "a\nb"]


def test_edit_without_text_prefills_the_prompt_and_sends_the_edit(h: Harness):
    drive(h, "hello there" + ENTER, "/edit 1" + ENTER, " again" + ENTER)
    assert user_texts(h) == ["hello there again"]
    out = h.text()
    assert "cache: cut at token " in out and "recomputing " in out
    assert len(stats_lines(out)) == 2
    branches = h.store.branches(h.chat.session.id)
    assert len(branches) == 2  # the old turn is kept
    assert h.repl.prefill is None


def test_edit_prefill_can_be_rewritten_whole(h: Harness):
    drive(h, "hello there" + ENTER, "/edit 1" + ENTER, "\x15" + "something else" + ENTER)  # ^U
    assert user_texts(h) == ["something else"]


def test_ctrl_c_at_a_prefilled_prompt_cancels_the_edit(h: Harness):
    drive(h, "hello there" + ENTER, "/edit 1" + ENTER, CTRL_C, "next" + ENTER)
    assert user_texts(h) == ["hello there", "next"]
    assert len(h.store.branches(h.chat.session.id)) == 1
    assert h.repl.prefill is None


def test_history_file_lives_in_the_store_and_survives_a_restart(h: Harness, tiny):
    drive(h, "/history" + ENTER, "two" + ALT_ENTER + "lines" + ENTER, "first line" + ENTER)
    history = (h.home / "history").read_text()
    for entry in ("+/history", "+two\n+lines", "+first line"):
        assert entry in history
    h.close()
    h2 = make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS, interactive=True)
    try:
        drive(h2, UP + ENTER)  # Up: the last line of the previous run, read from the file
        assert user_texts(h2) == ["first line"]
    finally:
        h2.close()


def test_errors_are_one_line_and_the_loop_goes_on(h: Harness):
    drive(h, "/nope" + ENTER, "/edit 9 x" + ENTER, "hello there" + ENTER)
    out = lines_of(h.text())
    assert out[0].startswith("error: unknown command /nope")
    assert out[1].startswith("error: there is no turn 9")
    assert user_texts(h) == ["hello there"]


# ---------------------------------------------------------------------------------------------
# completion


def completions(h: Harness, text: str) -> list[str]:
    completer = SlashCompleter(h.repl.registry, h.chat)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]


def test_completes_command_names(h: Harness):
    assert completions(h, "/lo") == ["/load"]
    assert completions(h, "/b") == ["/branch", "/branches"]
    assert "/quit" in completions(h, "/") and "/exit" in completions(h, "/")
    assert completions(h, "hello") == [] and completions(h, "") == []


def test_a_command_completion_replaces_what_was_typed(h: Harness):
    completer = SlashCompleter(h.repl.registry, h.chat)
    (c,) = completer.get_completions(Document("/hist"), CompleteEvent())
    assert (c.text, c.start_position) == ("/history", -5)
    assert "numbered" in c.display_meta_text


def test_completes_session_names_after_load(h: Harness):
    h.repl.handle("/new demo")
    h.repl.handle("/new other")
    h.repl.handle("/new")
    assert sorted(completions(h, "/load ")) == ["demo", "other"]
    assert completions(h, "/load de") == ["demo"]
    assert completions(h, "/load demo x") == []


def test_completes_fixed_arguments(h: Harness):
    assert completions(h, "/think ") == ["on", "off"]
    assert completions(h, "/think o") == ["on", "off"]
    assert completions(h, "/think of") == ["off"]
    assert completions(h, "/export ") == ["md", "json"]
    assert completions(h, "/set ") == list(SESSION_KEYS)
    assert completions(h, "/set temp") == ["temperature"]
    assert completions(h, "/history ") == []
    assert completions(h, "/nope ") == []


def test_completes_branch_ids(h: Harness):
    assert completions(h, "/branch ") == []
    h.repl.handle("hello there")
    h.repl.handle("/edit 1 hello again")
    ids = {str(b.leaf.id) for b in h.store.branches(h.chat.session.id)}
    assert set(completions(h, "/branch ")) == ids and len(ids) == 2


# ---------------------------------------------------------------------------------------------
# Ctrl-C during generation


def interrupt_renderer_at(h: Harness, monkeypatch, n: int, kind: type = TextDelta) -> list[str]:
    """Make the renderer raise KeyboardInterrupt on the n-th event of `kind` (once); returns the
    texts it showed before that."""
    feed, seen, shown = h.repl.renderer.feed, [0], []

    def interrupting_feed(event) -> None:
        if isinstance(event, kind):
            seen[0] += 1
            if seen[0] == n:
                raise KeyboardInterrupt
            if kind is TextDelta:
                shown.append(event.text)
        feed(event)

    monkeypatch.setattr(h.repl.renderer, "feed", interrupting_feed)
    return shown


def interrupt_forward_at(h: Harness, n: int) -> None:
    """Make the model's n-th forward pass (counted from now) raise KeyboardInterrupt, once."""
    h.model.raise_at(n, KeyboardInterrupt)


def check_interrupted_turn(h: Harness, out: str) -> None:
    answer = h.chat.history()[-1]
    assert answer.role == "assistant" and answer.interrupted
    (line,) = stats_lines(out)
    assert line.endswith("· interrupted")
    h.rt.engine.pc.check()
    export = h.store.turn_stats(h.chat.session.id)
    assert export[-1][0].id == answer.id  # the stats of the partial turn are stored with it


def check_next_turn_reuses(h: Harness) -> None:
    cached = len(h.rt.engine.pc.ids)
    out = h.run("and then?")
    assert len(stats_lines(out)) == 1 and "interrupted" not in out
    assert h.last_stats.reused_tokens > 0
    assert h.last_stats.reused_tokens >= cached - 2
    assert not h.chat.history()[-1].interrupted
    h.rt.engine.pc.check()


def test_ctrl_c_while_the_answer_is_shown_keeps_the_partial_answer(h: Harness, monkeypatch):
    shown = interrupt_renderer_at(h, monkeypatch, 3)
    out = h.run("hello there")
    check_interrupted_turn(h, out)
    partial = h.chat.history()[-1].content
    assert shown and partial.startswith("".join(shown).lstrip("\n"))
    assert h.last_stats.generated_tokens < SETTINGS.max_tokens
    assert f"generated {h.last_stats.generated_tokens} ·" in out
    monkeypatch.undo()
    check_next_turn_reuses(h)


def test_the_snapshot_after_an_interrupt_is_valid_and_reused_after_a_restart(h: Harness, tiny):
    interrupt_forward_at(h, 3)
    h.run("/new demo", "hello there")
    assert h.chat.history()[-1].interrupted
    cached = len(h.rt.engine.pc.ids)
    assert h.chat.kv.n_tokens_on_disk(h.chat.session.id) == cached
    h.close()
    h2 = make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS, interactive=True)
    try:
        out = lines_of(h2.run("/load demo"))
        assert out == [f"snapshot: restored {cached} cached tokens from disk", out[-1]]
        assert re.search(r"reused [1-9][\d,]* tokens", out[-1])
        h2.rt.engine.pc.check()
    finally:
        h2.close()


@pytest.mark.parametrize("step", [2, 4])
def test_ctrl_c_inside_the_model_during_decoding(h: Harness, step):
    interrupt_forward_at(h, step)  # forward 1 is the prefill
    out = h.run("hello there")
    check_interrupted_turn(h, out)
    assert h.last_stats.generated_tokens == step - 1
    assert h.chat.history()[-1].content in out
    check_next_turn_reuses(h)


def test_ctrl_c_inside_the_model_during_prefill(h: Harness):
    h.run("hello there")
    interrupt_forward_at(h, 1)
    out = h.run("how are you?")
    check_interrupted_turn(h, out)
    assert h.chat.history()[-1].content == ""
    assert h.last_stats.generated_tokens == 0
    check_next_turn_reuses(h)


def test_ctrl_c_during_a_chunked_prefill_reports_what_was_prefilled(h: Harness):
    h.rt.engine.chunk_size = 4
    interrupt_forward_at(h, 3)  # after two chunks of 4
    out = h.run("hello there, how are you?")
    check_interrupted_turn(h, out)
    assert len(h.rt.engine.pc.ids) == 8
    assert h.last_stats.prefilled_tokens == 8
    # the export says what was computed, and no time to a first token that never came
    md = h.run("/export md")
    assert "*reused 0 · prefilled 8 · generated 0*" in md and " s · " not in md.split("###")[-1]


def test_ctrl_c_in_the_interactive_loop_returns_to_the_prompt(h: Harness, monkeypatch):
    interrupt_renderer_at(h, monkeypatch, 2)
    assert drive(h, "hello there" + ENTER, "second message" + ENTER, "/history" + ENTER) == 0
    messages = h.chat.history()
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m.interrupted for m in messages] == [False, True, False, False]
    lines = stats_lines(h.text())
    assert len(lines) == 2 and lines[0].endswith("interrupted")
    assert "[assistant (interrupted)]" in h.text()
    h.rt.engine.pc.check()


def test_ctrl_c_before_the_first_token_does_not_repeat_the_last_stats(h: Harness, monkeypatch):
    h.run("hello there")
    previous = format_stats(h.last_stats)
    interrupt_renderer_at(h, monkeypatch, 1, kind=Notice)  # the "cache: cut at …" notice
    out = h.run("/edit 1 hello again")
    assert out == "interrupted\n"  # no figures: nothing was computed
    assert previous not in out
    h.rt.engine.pc.check()


def test_ctrl_c_before_the_first_token_still_closes_the_turn(h: Harness, monkeypatch):
    h.run("hello there")
    interrupt_renderer_at(h, monkeypatch, 1, kind=Notice)  # the "cache: cut at …" notice
    h.run("/edit 1 hello again")
    answer = h.chat.history()[-1]
    assert (answer.role, answer.content, answer.interrupted) == ("assistant", "", True)


# ---------------------------------------------------------------------------------------------
# a turn the context cannot hold

LONG = "The capital of France is Paris. " * 20  # 160 tokens of the tiny tokenizer


def fill_context(h: Harness) -> str:
    """Two long turns, then a third that does not fit in 512 tokens; returns its output."""
    h.run(LONG, LONG)
    assert len(h.chat.sessions.user_turns()) == 2
    return h.run(LONG)


def test_a_turn_over_the_context_is_refused_without_a_model_call(h: Harness):
    h.run(LONG, LONG)
    calls, cached = len(h.calls), list(h.rt.engine.pc.ids)
    out = h.run(LONG)
    errors = [line for line in lines_of(out) if line.startswith("error: ")]
    assert len(errors) == 1
    assert re.search(r"the conversation is [\d,]+ tokens; the model's context is 512", errors[0])
    assert "/undo" in errors[0] and "drop_oldest" in errors[0]
    assert len(h.calls) == calls  # nothing was computed
    assert h.rt.engine.pc.ids == cached
    h.rt.engine.pc.check()


def test_a_refused_turn_prints_only_the_error(h: Harness):
    out = fill_context(h)
    assert [line for line in lines_of(out) if not line.startswith("error: ")] == []


def test_a_refused_message_does_not_stay_on_the_branch(h: Harness):
    fill_context(h)
    assert len(h.chat.sessions.user_turns()) == 2
    out = h.run("ok")  # 440 tokens with the two long turns: fits
    assert len(stats_lines(out)) == 1, out


def test_a_refused_edit_leaves_the_tree_as_it_was(h: Harness):
    h.run(LONG, LONG)
    before = h.store.branches(h.chat.session.id)
    out = lines_of(h.run("/edit 2 " + LONG + LONG))
    assert len(out) == 1 and out[0].startswith("error: the conversation is ")
    assert h.store.branches(h.chat.session.id) == before
    assert [m.content for m in h.chat.sessions.user_turns()] == [LONG, LONG]


def test_a_failure_inside_a_turn_is_one_line_and_the_repl_goes_on(h: Harness):
    h.run("hello there")
    h.model.raise_at(1, RuntimeError("boom"), every=True)
    out = h.run("how are you?")
    log = h.home / "kvrepl.log"
    said = f"error: internal error: RuntimeError: boom (the details are in {log})"
    assert lines_of(out)[-1] == said
    assert stats_lines(out) == [] and "interrupted" not in out  # no figures: none were made
    assert "RuntimeError: boom" in log.read_text() and "Traceback" in log.read_text()
    assert run_kvrepl(["path", "--log"], home=h.home, stdin=None).out == f"{log}\n"
    h.rt.engine.pc.check()
    h.model.heal()
    assert len(stats_lines(h.run("and then?"))) == 1


# ---------------------------------------------------------------------------------------------
# the real model in the interactive loop


@pytest.mark.model
def test_real_model_answer_is_rendered_with_a_stats_line(real, tmp_path):
    h = make_harness(tmp_path / "store", real, settings=Settings(temperature=0, max_tokens=24),
                     interactive=True, plain=False)  # fmt: skip
    try:
        drive(h, "What is the capital of France?" + ENTER)
        screen = ANSI.sub("", h.text())
        assert "Paris" in h.chat.history()[-1].content
        assert "Paris" in screen
        (line,) = [s for s in screen.splitlines() if s.lstrip().startswith("reused 0 · prefilled")]
        assert re.search(r"reused 0 · prefilled \d+ · generated \d+ · ttft [\d.]+ s", line)
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# piped stdin: the line loop, no prompt-toolkit, no ANSI


@pytest.mark.model
def test_piped_stdin_answers_and_runs_commands_without_ansi(tmp_path):
    home = tmp_path / "home"
    questions = tmp_path / "in.txt"
    questions.write_text("What is the capital of France?\n/history\n")
    # stdin and stdout files; NO_COLOR is not set: no ANSI must come from plain mode alone
    done = run_kvrepl(["--temperature", "0", "--max-tokens", "20"], home=home, stdin=questions,
                      out_dir=tmp_path / "run")  # fmt: skip
    out, err = done.out, done.err
    assert done.rc == 0, err
    assert "\x1b" not in out and "\x1b" not in err
    assert "Paris" in out
    (line,) = stats_lines(err)  # piped: the figures go to stderr, the answer alone to stdout
    # the first line waited for the model: its ttft counts from Enter, and says so
    assert re.fullmatch(r"reused 0 · prefilled \d+ · generated \d+ · ttft ([\d.]+) s "
                        r"\(([\d.]+) s of it loading the model\) · [\d.]+ tok/s"
                        r"( · drafted \d+ \(\d+ accepted\))?( · max tokens)?", line)  # fmt: skip
    assert stats_lines(out) == []
    assert "[1. you] What is the capital of France?" in out  # what /history prints
    assert (home / "kvrepl.db").is_file()


def test_stdin_lines_replace_invalid_utf8():
    raw = io.TextIOWrapper(io.BytesIO(b"caf\xc3\xa9\nbad \xff\xfe bytes\n/history\n"), "utf-8")
    assert list(stdin_lines(raw)) == ["café\n", "bad \ufffd\ufffd bytes\n", "/history\n"]


def test_stdin_from_dev_null_exits_zero_with_no_ansi(tmp_path):
    done = run_kvrepl([], home=tmp_path / "home", stdin=None, out_dir=tmp_path / "run")
    assert done.rc == 0, done.err
    assert done.out == "" and done.err == ""


def test_tab_completes_in_the_prompt(h: Harness, monkeypatch: pytest.MonkeyPatch):
    """The completer is wired to the prompt: Tab, then (once the completion is in the line)
    Enter."""
    import prompt_toolkit

    sessions: list[Any] = []

    class Recorded(prompt_toolkit.PromptSession):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            sessions.append(self)

    monkeypatch.setattr(prompt_toolkit, "PromptSession", Recorded)
    with create_pipe_input() as pipe:

        def typist() -> None:
            # Keys apart, as typed: completion runs as a task that a key arriving in the same
            # read would cancel (so would a fast typist's Tab; this is prompt-toolkit's way).
            # Enter waits until the completion is in the line: a loaded machine is slow.
            pipe.send_text("/hist")
            time.sleep(0.2)
            pipe.send_text("\t")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                sessions and sessions[0].default_buffer.text != "/hist"
            ):
                time.sleep(0.05)
            for key in (ENTER, CTRL_D):
                pipe.send_text(key)
                time.sleep(0.2)

        thread = threading.Thread(target=typist)
        thread.start()
        try:
            interactive_loop(h.repl, h.home, toolbar=lambda: "", input=pipe, output=DummyOutput())
        finally:
            thread.join()
    assert h.text() == "no turns yet\n"
