"""kvrepl in the shell (issue "Fits the shell and the user's machine"): piped, stdout holds the
answers alone and notices, stats and errors go to stderr; the exit status is 1 when any line
failed; `kvrepl "question"` answers and exits (after any piped text, in the same message);
`-c/--continue` goes on with the most recent session; `--json` prints one object per answer.

The renderer's split and the parsing are unit tests; the CLI runs in-process on a tiny model
folder (capsys: stdout is not a terminal), and in real processes where file descriptors and exit
statuses are the point."""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
from fault_helpers import make_fault_model
from helpers import make_harness, render_events, tiny_loaded
from makers import make_tokenizer
from procs import Kvrepl, run_kvrepl
from test_render import STATS, STATS_LINE, output, plain_console

from kvrepl.app import cli
from kvrepl.app.args import parse
from kvrepl.app.render import Renderer
from kvrepl.app.renderers import make_renderer
from kvrepl.app.repl import line_loop
from kvrepl.chat.turn import Result
from kvrepl.config import Settings
from kvrepl.events import Finish, Notice, TextDelta, ThinkDelta
from kvrepl.store.db import Store

FLAGS = ["--temperature", "0", "--max-tokens", "6", "--device", "cpu", "--dtype", "float32"]
STATS_RE = re.compile(r"^reused [\d,]+ · prefilled [\d,]+ · generated [\d,]+ ", re.M)
LONG = "hello there " * 400  # over the tiny model's context of 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model as a folder, for `--model DIR` (untied: its answers are varied text)."""
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("models") / "tiny"
    make_fault_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def home(_isolated_home: Path) -> Path:
    return _isolated_home  # KVREPL_HOME, set by conftest for every test


def answers(home: Path) -> list[tuple[str, str, str, dict]]:
    """(session id, session name, answer, stats) of every stored answer, oldest first."""
    store = Store(home / "kvrepl.db")
    try:
        out = []
        for s in sorted(store.list_sessions(), key=lambda s: s.updated):
            out += [(s.id, s.name, m.content, st) for m, st in store.turn_stats(s.id)]
        return out
    finally:
        store.close()


def user_messages(home: Path) -> list[str]:
    store = Store(home / "kvrepl.db")
    try:
        return [m.content for s in store.list_sessions() for m in store.active_branch(s.id)
                if m.role == "user"]  # fmt: skip
    finally:
        store.close()


def printed(*texts: str) -> str:
    """What the answers read as on stdout: each on its own lines, a blank line between."""
    return "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


# ---------------------------------------------------------------------------------------------
# the renderer: which stream gets what


def split_renderer(**kwargs) -> tuple[Renderer, object, object]:
    out, err = plain_console(), plain_console()
    return make_renderer(out, err=err, **kwargs), out, err


def test_piped_answers_go_to_stdout_and_the_rest_to_stderr():
    r, out, err = split_renderer()
    restored = Notice("snapshot: restored 40 cached tokens")
    render_events(r, [restored, TextDelta("Hi"), Finish("stop"), STATS])
    render_events(r, [TextDelta("Two\nlines"), Finish("length"), STATS])
    assert output(out) == "Hi\n\nTwo\nlines\n"  # a blank line between answers
    assert output(err) == (f"snapshot: restored 40 cached tokens\n{STATS_LINE}\n"
                           f"{STATS_LINE} · max tokens\n")  # fmt: skip


def test_piped_commands_print_their_output_on_stdout_and_what_they_did_on_stderr():
    r, out, err = split_renderer()
    r.info("[1. you] hello")
    r.print_table(("key", "value"), [("top_k", 0)])
    r.print_markdown("# demo")
    r.confirm("saved as 'demo'")
    r.error("boom")
    assert output(out) == "[1. you] hello\ntop_k\t0\n# demo\n"
    assert output(err) == "saved as 'demo'\nerror: boom\n"


def test_piped_thinking_is_a_hint_on_stderr_unless_shown():
    events = [ThinkDelta("hmm"), TextDelta("Yes."), Finish("stop"), STATS]
    r, out, err = split_renderer()
    render_events(r, events)
    assert output(out) == "Yes.\n"
    assert output(err) == f"(thought for 3 chars — /think to show)\n{STATS_LINE}\n"
    r, out, err = split_renderer(show_think=True)
    render_events(r, events)
    assert output(out) == "<think>\nhmm\n</think>\nYes.\n"


def test_json_lines_print_one_object_per_answer_and_nothing_else_on_stdout():
    r, out, err = split_renderer(json_lines=True)
    about = {"session_id": "ab12", "session_name": "demo"}
    r.begin(about)
    for event in [Notice("note"), ThinkDelta("hmm"), TextDelta("Hi "), TextDelta("there.")]:
        r.feed(event)
    r.end(Result(stats=STATS, finish_reason="stop"))
    r.info("[1. you] hello")  # a command's output: not JSON, so not on stdout
    r.begin(about)
    r.feed(TextDelta("Par"))
    r.end(Result(stats=STATS, interrupted=True))
    r.begin(about)  # a refused turn: its error line says it all
    r.end()
    r.error("over the context")
    first, second = [json.loads(line) for line in output(out).splitlines()]
    assert first == {"session_id": "ab12", "session_name": "demo", "answer": "Hi there.",
                     "finish_reason": "stop", "stats": STATS.as_dict()}  # fmt: skip
    assert (second["answer"], second["finish_reason"]) == ("Par", "interrupted")
    assert output(err) == "note\n[1. you] hello\nerror: over the context\n"
    r, out, _ = split_renderer(json_lines=True, show_think=True)
    render_events(r, [ThinkDelta("hmm"), TextDelta("Yes."), Finish("stop"), STATS])
    assert json.loads(output(out))["think"] == "hmm"


# ---------------------------------------------------------------------------------------------
# exit status: 1 when any line failed


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (["Hello there", "/history", "q"], 0),
        (["Hello there", "/bogus"], 1),  # a refused command
        (["/load nosuch", "Hello there"], 1),  # a failed command, then a good line
        ([LONG], 1),  # a message over the context
    ],
)
def test_the_line_loop_exits_1_when_any_line_failed(tmp_path, tiny, lines, status):
    h = make_harness(tmp_path / "store", tiny_loaded(tiny))
    try:
        assert line_loop(h.repl, lines) == status
    finally:
        h.close()


def test_an_interrupted_answer_is_a_failed_line(tmp_path, tiny, monkeypatch):
    settings = Settings(temperature=0.0, max_tokens=6, repetition_penalty=3.0)
    h = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=settings)
    feed = h.repl.renderer.feed

    def ctrl_c_at_text(event) -> None:
        if isinstance(event, TextDelta):
            raise KeyboardInterrupt
        feed(event)

    monkeypatch.setattr(h.repl.renderer, "feed", ctrl_c_at_text)
    try:
        assert line_loop(h.repl, ["Hello there"]) == 1
        assert h.chat.history()[-1].interrupted
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# the command line's words


@pytest.mark.parametrize(
    ("argv", "command", "prompt"),
    [
        ([], None, []),
        (["what", "is", "a", "path?"], None, ["what", "is", "a", "path?"]),
        (["path"], "path", []),
        (["--store", "s", "path", "--config"], "path", []),
        (["export", "demo", "--format", "json"], "export", []),
        (["rm", "demo"], "rm", []),
        (["--", "path"], None, ["path"]),  # the word itself, as a prompt
        (["path to the file?"], None, ["path to the file?"]),  # one quoted argument
        (["--session", "path", "hi"], None, ["hi"]),  # a flag's value is not a first word
        (["-c", "--json", "go", "--temperature", "0", "on"], None, ["go", "on"]),
    ],
)
def test_the_first_word_tells_a_subcommand_from_a_prompt(argv, command, prompt):
    args = parse(argv)
    assert (args.command, args.prompt) == (command, prompt)


def test_continue_and_resume_are_one_flag():
    assert parse(["-c"]).resume and parse(["--continue"]).resume and parse(["--resume"]).resume
    assert not parse([]).resume
    with pytest.raises(SystemExit):
        parse(["-c", "--session", "x"])


# ---------------------------------------------------------------------------------------------
# the CLI in this process (stdout captured: not a terminal)


def run_cli(capsys, monkeypatch, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_prompt_after_piped_text_is_one_message(model_dir, home, capsys, monkeypatch):
    argv = ["--model", str(model_dir), *FLAGS, "Summarise", "this."]
    rc, out, err = run_cli(capsys, monkeypatch, argv, stdin="The capital of France is Paris.\n")
    assert rc == 0, err
    assert user_messages(home) == ["The capital of France is Paris.\n\nSummarise this."]
    ((_, _, answer, _),) = answers(home)
    assert out == printed(answer)
    assert len(STATS_RE.findall(err)) == 1


def test_a_failed_prompt_exits_1_with_its_error_on_stderr(model_dir, home, capsys, monkeypatch):
    rc, out, err = run_cli(capsys, monkeypatch, ["--model", str(model_dir), *FLAGS, LONG])
    assert (rc, out) == (1, "")
    assert re.fullmatch(r"error: this message is [\d,]+ tokens; .*\n", err)


def test_a_prompt_is_always_a_message_even_a_subcommands_name_or_a_slash(
    model_dir, home, capsys, monkeypatch
):
    argv = ["--model", str(model_dir), *FLAGS]
    assert run_cli(capsys, monkeypatch, [*argv, "--", "path"])[0] == 0
    assert run_cli(capsys, monkeypatch, [*argv, "/history"])[0] == 0
    assert sorted(user_messages(home)) == ["/history", "path"]  # two one-shots, two sessions


def test_json_in_line_mode_keeps_stdout_for_the_objects(model_dir, home, capsys, monkeypatch):
    argv = ["--model", str(model_dir), *FLAGS, "--json", "--session", "j"]
    rc, out, err = run_cli(capsys, monkeypatch, argv, stdin="Hello there\n/history\nhow are you?\n")
    assert rc == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    stored = answers(home)
    assert [o["answer"] for o in objects] == [a for _, _, a, _ in stored]
    assert [o["stats"] for o in objects] == [s for _, _, _, s in stored]
    assert {(o["session_id"], o["session_name"]) for o in objects} == {(stored[0][0], "j")}
    assert "[1. you] Hello there" in err and not STATS_RE.findall(err)


# ---------------------------------------------------------------------------------------------
# real processes: file descriptors and exit statuses


def test_real_processes_line_mode_one_shot_and_continue(model_dir, tmp_path):
    lines, shot = tmp_path / "lines" / "store", tmp_path / "shot" / "store"
    for home in (lines, shot):
        home.parent.mkdir()
    # Two at a time (two cores): a line loop with a refused line (its stdin a file), and a
    # one-shot question (stdin /dev/null).
    piped = lines.parent / "stdin"
    piped.write_bytes(b"Hello there\n/bogus\nhow are you?\n")
    a = Kvrepl(["--model", str(model_dir), *FLAGS], home=lines, stdin=piped)
    b = Kvrepl(["--model", str(model_dir), *FLAGS, "Hello there"], home=shot, stdin=None)
    rc, out, err = astuple(a.finish())
    assert rc == 1, err
    assert out == printed(*[text for _, _, text, _ in answers(lines)])
    assert len(STATS_RE.findall(err)) == 2
    assert "error: unknown command /bogus: /help lists them\n" in err

    rc, out, err = astuple(b.finish())
    assert rc == 0, err
    ((sid, _, first, stats),) = answers(shot)
    assert out == printed(first) and len(STATS_RE.findall(err)) == 1

    # -c in a new process: the same session, its snapshot reused whole.
    rc, out, err = astuple(run_kvrepl(["--model", str(model_dir), *FLAGS, "-c", "--json",
                                       "how are you?"], home=shot, stdin=None))  # fmt: skip
    assert rc == 0, err
    (obj,) = [json.loads(line) for line in out.splitlines()]
    cached = stats["reused_tokens"] + stats["prefilled_tokens"] + stats["generated_tokens"]
    assert (obj["session_id"], obj["stats"]["reused_tokens"]) == (sid, cached)
    assert obj["answer"] == answers(shot)[-1][2]
