"""A text file in a message (issue "Beyond the REPL"): `/read PATH` attaches a file to the next
message typed (as llama-cli's /read does), and `kvrepl -f FILE ...` puts files into the prompt
(as llm's -f does), each as a fenced block under its name before the typed text. The message
is stored whole, so a resume needs the file no more. A folder, a missing, unreadable or binary
file, an empty one and one that cannot fit the context are one line, and nothing is sent or
stored.

Through the users' doors: the REPL's line loop and its interactive loop (Tab completes the
path), kvrepl in real processes (tests/procs.py), and a resume after the file is gone."""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import make_fault_model
from helpers import Harness, make_harness, stats_lines, tiny_loaded
from makers import make_tokenizer
from procs import Kvrepl, run_kvrepl, stats_of
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from test_repl import ANSI, ENTER

from kvrepl.app.keys import SlashCompleter
from kvrepl.app.userfiles import Attachment, compose
from kvrepl.config import Settings
from kvrepl.events import Progress
from kvrepl.store.db import Store

SETTINGS = Settings(temperature=0.0, max_tokens=6, repetition_penalty=3.0)
NOTES = "The capital of France is Paris.\nHello there, how are you?\n"
TODO = "- buy milk\n"
FLAGS = ["--temperature", "0", "--max-tokens", "6", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def h(tmp_path: Path, tiny) -> Iterator[Harness]:
    harness = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=SETTINGS)
    yield harness
    harness.close()


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(NOTES)
    return path


def users(h: Harness) -> list[str]:
    return [m.content for m in h.chat.sessions.user_turns()]


def block(name: str, text: str) -> str:
    return f"{name}:\n```\n{text}```"


# ---------------------------------------------------------------------------------------------
# the message


def test_a_file_is_a_fenced_block_under_its_name_before_the_typed_text():
    a = Attachment("notes.txt", "one\ntwo")
    assert compose([a], "summarise this") == "notes.txt:\n```\none\ntwo\n```\n\nsummarise this"
    b = Attachment("b.md", "```py\nx = 1\n```\n")  # its own fences cannot close the block
    assert compose([a, b], "go").split("\n\n")[1] == "b.md:\n````\n```py\nx = 1\n```\n````"
    assert compose([a], "") == "notes.txt:\n```\none\ntwo\n```"


# ---------------------------------------------------------------------------------------------
# /read in the line loop


def test_read_attaches_the_file_to_the_next_message_only(h, notes):
    out = h.run(f"/read {notes}")
    n = h.rt.prompt.count_tokens(block(str(notes), NOTES))
    assert out == f"attached {notes} ({n:,} tokens): it goes with your next message\n"
    assert h.chat.session is None and h.calls == []  # nothing sent, nothing stored yet
    assert h.run("/read") == f"attached for your next message: {notes}\n"
    h.run("summarise this", "and now?")
    assert users(h) == [f"{block(str(notes), NOTES)}\n\nsummarise this", "and now?"]
    assert NOTES in h.rt.prompt.tokenizer.decode(h.streams[0])  # the prompt holds the text
    assert h.run("/read") == "nothing attached: /read PATH attaches a file to your next message\n"


def test_two_files_go_in_the_order_read_and_drop_forgets_them(h, notes, tmp_path):
    other = tmp_path / "todo.md"
    other.write_text(TODO)
    h.run(f"/read {notes}", f"/read '{other}'")
    assert h.run("/read --drop") == f"forgot {notes}, {other}: nothing attached\n"
    h.run(f"/read {other}", f"/read {notes}", "what is left?")
    assert users(h) == [f"{block(str(other), TODO)}\n\n{block(str(notes), NOTES)}\n\nwhat is left?"]


def test_a_path_with_a_tilde_is_read_from_home_and_named_as_typed(h, notes, monkeypatch):
    monkeypatch.setenv("HOME", str(notes.parent))
    assert h.run("/read ~/notes.txt").startswith("attached ~/notes.txt (")
    h.run("hi")
    assert users(h) == [f"{block('~/notes.txt', NOTES)}\n\nhi"]


def refusals(tmp: Path) -> list[tuple[str, str]]:
    """(path, the one line) for each file that cannot be read."""
    (tmp / "bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    (tmp / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp / "empty.txt").write_text("\n \n")
    (tmp / "locked.txt").write_text("secret")
    (tmp / "locked.txt").chmod(0)
    (tmp / "folder").mkdir()
    return [
        (f"{tmp}/missing.txt", f"cannot read {tmp}/missing.txt: there is no such file"),
        (f"{tmp}/folder", f"cannot read {tmp}/folder: it is a folder; name a file in it"),
        (f"{tmp}/bin", f"cannot read {tmp}/bin: it is a binary file, not text"),
        (
            f"{tmp}/latin1.txt",
            f"cannot read {tmp}/latin1.txt: it is not UTF-8 text (byte 3 is not UTF-8)",
        ),
        (f"{tmp}/empty.txt", f"{tmp}/empty.txt is empty: nothing to read"),
        (f"{tmp}/locked.txt", f"cannot read {tmp}/locked.txt: permission denied"),
    ]


def test_a_file_that_cannot_be_read_is_one_line_and_nothing_is_attached(h, tmp_path):
    for path, said in refusals(tmp_path):
        if path.endswith("locked.txt") and os.geteuid() == 0:
            continue  # root reads any file
        assert h.run(f"/read {path}") == f"error: {said}\n", path
    assert h.run("/read").startswith("nothing attached")
    h.run("hi")
    assert users(h) == ["hi"]


def test_a_file_over_the_context_is_one_line_and_nothing_is_sent(h, tmp_path):
    """The tiny model's context is 512 tokens: a message holds at most 496."""
    big = tmp_path / "big.txt"
    big.write_text("hello there " * 400)
    n = h.rt.prompt.count_tokens(block(str(big), "hello there " * 400 + "\n"))
    said = f"cannot read {big}: it is {n:,} tokens, and a message holds at most 496 in this model's"
    assert h.run(f"/read {big}") == f"error: {said} context\n"
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (64 * 496 + 1))  # refused unread: no tokenizer runs on it
    said = f"cannot read {huge}: it is 31.0 KiB, far more than a message can hold (at most 496"
    assert h.run(f"/read {huge}") == f"error: {said} tokens in a message)\n"
    half = tmp_path / "half.txt"
    half.write_text("hello there " * 100)
    h.run(f"/read {half}")
    out = h.run(f"/read {half}", f"/read {half}")  # together they cannot fit
    assert out.count("error: ") == 2 and "(/read --drop forgets what is attached)" in out
    assert h.chat.session is None and h.calls == []


def test_a_message_that_cannot_fit_with_its_file_keeps_the_file_for_the_next(
        h, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a short name: the block's tokens do not hang on tmp_path's
    half = tmp_path / "half.txt"
    half.write_text("hello there " * 100)
    h.run("/read half.txt")
    out = h.run("hello there " * 80)
    assert re.fullmatch(r"error: this message is [\d,]+ tokens; .* \(with .*half\.txt; /read "
                        r"--drop forgets it\)\n", out)  # fmt: skip
    assert h.chat.session is None and h.calls == []  # nothing stored, nothing computed
    h.run("summarise")
    assert users(h) == [f"{block('half.txt', 'hello there ' * 100 + chr(10))}\n\nsummarise"]


def test_a_file_never_followed_by_a_message_fails_the_line_loop(h, notes):
    from kvrepl.app.repl import line_loop

    assert line_loop(h.repl, [f"/read {notes}\n", "/history\n"]) == 1
    assert h.text().endswith(f"error: {notes} not sent: no message came after it\n")
    assert h.chat.session is None


def test_a_long_file_shows_the_prefill_progress_line(tiny, tmp_path):
    """A file of many tokens is a long prefill: its progress line shows in a terminal (the
    renderer shows it once a prefill has run a second: each chunk here takes 0.3 s)."""
    h = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=SETTINGS, plain=False)
    try:
        h.rt.engine.chunk_size = 64
        doc = tmp_path / "doc.txt"
        doc.write_text("The capital of France is Paris. " * 40)
        h.run(f"/read {doc}")
        fed: list[Any] = []
        feed = h.repl.renderer.feed
        h.repl.renderer.feed = lambda e: (fed.append(e), feed(e))[1]  # type: ignore[method-assign]
        h.model.before = lambda n: time.sleep(0.3) if n > 1 else None
        screen = ANSI.sub("", h.run("summarise"))
        progress = [e for e in fed if isinstance(e, Progress)]
        assert len(progress) >= 3 and progress[-1].total == h.last_stats.prefilled_tokens
        assert re.search(r"prefill [\d,]+ / [\d,]+ tokens · [\d,]+ tok/s · [\d,]+ s left", screen)
        assert len(stats_lines(screen)) == 1
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# Tab completes the path


def completions(h: Harness, text: str) -> list[tuple[str, int]]:
    completer = SlashCompleter(h.repl.registry, h.chat)
    return [(c.text, c.start_position)
            for c in completer.get_completions(Document(text), CompleteEvent())]  # fmt: skip


def test_tab_completes_the_path_after_read(h, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "notes two.md").write_text("x")
    (tmp_path / "nothing").mkdir()
    assert sorted(completions(h, f"/read {tmp_path}/no")) == [
        ("tes two.md", 0), ("tes.txt", 0), ("thing", 0)]  # fmt: skip
    assert completions(h, f"/read {tmp_path}/notes t") == [("wo.md", 0)]  # a space in a path
    assert ("/read", -3) in completions(h, "/re")


def test_tab_then_enter_reads_the_file_in_the_interactive_loop(tiny, tmp_path, notes):
    """Typed as a person types (test_repl's test_tab_completes_in_the_prompt says why): the
    path's start, Tab, and Enter once the completion is in the line; then a message."""
    import prompt_toolkit
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from kvrepl.app.repl import interactive_loop

    h = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=SETTINGS, interactive=True)
    sessions: list[Any] = []

    class Recorded(prompt_toolkit.PromptSession):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            sessions.append(self)

    typed = f"/read {notes.parent}/no"

    def typist(pipe: Any) -> None:
        pipe.send_text(typed)
        time.sleep(0.2)
        pipe.send_text("\t")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            sessions and sessions[0].default_buffer.text != typed
        ):
            time.sleep(0.05)
        for key in (ENTER, "summarise" + ENTER, "\x04"):
            pipe.send_text(key)
            time.sleep(0.2)

    try:
        with pytest.MonkeyPatch.context() as mp, create_pipe_input() as pipe:
            mp.setattr(prompt_toolkit, "PromptSession", Recorded)
            thread = threading.Thread(target=typist, args=(pipe,))
            thread.start()
            try:
                interactive_loop(h.repl, h.home, toolbar=lambda: "", input=pipe,
                                 output=DummyOutput())  # fmt: skip
            finally:
                thread.join()
        assert users(h) == [f"{block(str(notes), NOTES)}\n\nsummarise"]
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# a resume needs the file no more


def test_a_resume_after_the_file_is_gone_has_its_text_in_history_and_the_prompt(
    h, notes, tiny, monkeypatch
):
    monkeypatch.chdir(notes.parent)
    h.run("/read notes.txt", "summarise this")
    cached = len(h.rt.engine.pc.ids)
    notes.unlink()
    h.close()
    again = make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS)
    try:
        out = again.run("/load " + again.store.list_sessions()[0].id)
        assert f"reused {cached:,} tokens, recomputed " in out  # the snapshot agrees with it
        shown = again.run("/history")
        assert "[1. you] notes.txt: ``` The capital of France is Paris. Hello there, how" in shown
        again.run("and now?")
        assert NOTES in again.rt.prompt.tokenizer.decode(again.streams[-1])
        assert again.last_stats.reused_tokens > cached
    finally:
        again.close()


# ---------------------------------------------------------------------------------------------
# kvrepl -f FILE, in real processes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model as a folder, for `--model DIR` (untied: its answers are varied text)."""
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("models") / "tiny"
    make_fault_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def stored_users(home: Path) -> list[str]:
    store = Store(home / "kvrepl.db")
    try:
        return [m.content for s in store.list_sessions() for m in store.active_branch(s.id)
                if m.role == "user"]  # fmt: skip
    finally:
        store.close()


def test_dash_f_in_processes_then_a_resume_without_the_file(model_dir, tmp_path, notes):
    """-f twice with a prompt, and -f with piped lines (the first message takes it), side by
    side; then the first session goes on in a new process once its file is deleted."""
    todo = tmp_path / "todo.md"
    todo.write_text(TODO)
    shot, lines = tmp_path / "shot" / "store", tmp_path / "lines" / "store"
    for home in (shot, lines):
        home.parent.mkdir()
    model = ["--model", str(model_dir), *FLAGS]
    a = Kvrepl([*model, "-f", "notes.txt", "--file", "todo.md", "what", "is", "left?"],
               home=shot, stdin=None, cwd=tmp_path)  # fmt: skip
    b = Kvrepl([*model, "-f", "notes.txt"], home=lines, stdin="summarise\nand now?\n", cwd=tmp_path)
    rc, out, err = astuple(a.finish())
    assert rc == 0, err
    both = f"{block('notes.txt', NOTES)}\n\n{block('todo.md', TODO)}"
    assert stored_users(shot) == [f"{both}\n\nwhat is left?"]
    ((_, prefilled, generated),) = stats_of(err)
    assert out.strip()
    rc, out, err = astuple(b.finish())
    assert rc == 0, err
    assert stored_users(lines) == [f"{block('notes.txt', NOTES)}\n\nsummarise", "and now?"]

    notes.unlink()
    todo.unlink()
    rc, out, err = astuple(run_kvrepl([*model, "-c"], home=shot, stdin="/history\nthanks\n"))
    assert rc == 0, err
    assert "[1. you] notes.txt: ``` The capital of France is Paris. Hello there, how" in out
    # The stored message renders as it was computed: the whole snapshot is reused.
    assert f"snapshot: restored {prefilled + generated} cached tokens" in err
    assert stats_of(err)[0][0] == prefilled + generated


def test_dash_f_that_cannot_be_read_is_one_line_and_stores_nothing(model_dir, tmp_path):
    bad = tmp_path / "bin"
    bad.write_bytes(b"\x00\x01\x02")
    home = tmp_path / "store"
    done = run_kvrepl(["--model", str(model_dir), *FLAGS, "-f", str(bad), "hi"], home=home,
                      stdin=None)  # fmt: skip
    assert (done.rc, done.out) == (1, "")
    assert done.err == f"kvrepl: cannot read {bad}: it is a binary file, not text\n"
    assert not home.exists()  # no store, no session, no model loaded


def test_dash_f_over_the_context_is_one_line_and_stores_nothing(model_dir, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    """In process (the CLI's own main; stdout is not a terminal): the tiny model's context is
    512 tokens, and the file alone is more."""
    from kvrepl.app import cli

    big = tmp_path / "big.txt"
    big.write_text("hello there " * 400)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nothing piped
    rc = cli.main(["--model", str(model_dir), *FLAGS, "-f", "big.txt", "summarise"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert re.fullmatch(r"error: this message is [\d,]+ tokens; the model's context is 512 tokens "
                        r"\(at most 496 for a message\): shorten it or send it in parts \(with "
                        r"big\.txt\)\n", err)  # fmt: skip
    assert stored_users(tmp_path / "store") == []
