"""Slash commands as plain functions, imported alone and called with a small fake conversation:
no model, no store. (test_commands.py runs every command through the REPL over a real model.)"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from kvrepl.app.commands import (
    BUILTINS,
    Command,
    Context,
    Generate,
    Prefill,
    Quit,
    build_registry,
    cmd_edit,
    cmd_help,
    cmd_history,
    cmd_quit,
    cmd_set,
    cmd_think,
    session_rows,
)
from kvrepl.app.renderers import make_renderer
from kvrepl.config import SESSION_KEYS, Settings
from kvrepl.errors import UsageError
from kvrepl.store.records import Message, SessionSummary


class FakeSessions:
    """Just what the commands below ask of the open session: options and turns."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}
        self.turns = ["first question", "second\n  question"]
        self.label = ""

    def set_option(self, key: str, value: Any) -> None:
        self.options[key] = value

    def user_turn(self, n: int) -> Message:
        if not 1 <= n <= len(self.turns):
            raise UsageError(f"no turn {n}")
        return message("user", self.turns[n - 1])


class FakeChat:
    """Just what the commands below ask of a `Conversation`: its session, edits, history and
    whether the model (loaded or not) has a thinking switch."""

    def __init__(self, *, loaded: bool = False, supports_thinking: bool = True) -> None:
        self.sessions = FakeSessions()
        self.options = self.sessions.options
        self.turns = self.sessions.turns
        self.edits: list[tuple[int, str]] = []
        self.settings = Settings()
        self._switch = supports_thinking if loaded else None

    def thinking_switch(self) -> bool | None:
        return self._switch

    def edit(self, n: int, text: str) -> list[str]:
        self.edits.append((n, text))
        return ["events"]

    def history(self) -> list[Message]:
        return [message("user", self.turns[0]), message("assistant", "an answer"),
                message("user", self.turns[1]), message("assistant", "cut", True)]  # fmt: skip


def message(role: str, content: str, interrupted: bool = False) -> Message:
    return Message(1, "s1", None, role, content, None, "2025-01-01", interrupted)


def context(chat: Any = None, *, interactive: bool = True) -> tuple[Context, io.StringIO]:
    out = io.StringIO()
    renderer = make_renderer(Console(file=out, width=80, force_terminal=False), plain=True)
    return Context(chat or FakeChat(), renderer, build_registry(), interactive), out


def test_every_builtin_is_a_plain_module_function_declared_once():
    names = [cmd.name for cmd in BUILTINS]
    assert len(names) == len(set(names)) == len(build_registry().commands)
    for cmd in BUILTINS:
        assert cmd.func.__module__ == "kvrepl.app.commands"
        assert cmd.func.__qualname__ == f"cmd_{cmd.name}"


def test_each_registry_is_fresh():
    reg = build_registry()
    reg.add(Command("zzlocal", lambda ctx, arg: None))
    assert reg.find("zzlocal") and build_registry().find("zzlocal") is None


def test_help_lists_the_registry_and_one_command():
    ctx, out = context()
    assert cmd_help(ctx, "") is None
    lines = out.getvalue().splitlines()
    assert lines[0] == "/help [command]\tlist the commands, or show one (also /?)"
    assert len(lines) == len(ctx.registry.commands) + 1
    assert lines[-1].endswith("Ctrl-D, /quit or q alone quits.")
    ctx, out = context()
    cmd_help(ctx, "/quit")
    assert out.getvalue() == "/quit\tleave (everything is saved) (also /exit, /q)\n"
    with pytest.raises(UsageError, match="no command nope"):
        cmd_help(ctx, "nope")


def test_quit_returns_quit():
    ctx, out = context()
    assert cmd_quit(ctx, "") == Quit() and out.getvalue() == ""


def test_think_toggles_the_renderer_and_switches_the_mode_without_loading_the_model():
    ctx, out = context()
    cmd_think(ctx, "")
    assert ctx.renderer.show_think and ctx.chat.options == {}
    cmd_think(ctx, "off")
    assert not ctx.renderer.show_think and ctx.chat.options == {"thinking": False}
    assert out.getvalue() == ("thinking shown\nthinking hidden; thinking mode off where the "
                              "model's template has a switch\n")  # fmt: skip
    no_switch = "thinking shown (this model's template has no thinking switch)\n"
    for chat, said in [(FakeChat(loaded=True), "thinking shown; thinking mode on\n"),
                       (FakeChat(loaded=True, supports_thinking=False), no_switch)]:  # fmt: skip
        ctx, out = context(chat)
        cmd_think(ctx, "on")
        assert out.getvalue() == said
    with pytest.raises(UsageError, match="on or off, not 'maybe'"):
        cmd_think(ctx, "maybe")


def test_edit_with_text_generates_and_without_text_prefills_the_old_turn():
    ctx, _ = context()
    outcome = cmd_edit(ctx, "2 new words")
    assert isinstance(outcome, Generate) and ctx.chat.edits == [(2, "new words")]
    outcome = cmd_edit(ctx, "1")
    assert isinstance(outcome, Prefill) and outcome.text == "first question"
    assert isinstance(outcome.then("changed"), Generate) and ctx.chat.edits[-1] == (1, "changed")
    with pytest.raises(UsageError, match="no turn 3"):
        cmd_edit(ctx, "3")
    with pytest.raises(UsageError, match="turn number"):
        cmd_edit(ctx, "x y")
    ctx, _ = context(interactive=False)
    with pytest.raises(UsageError, match="give the new text"):
        cmd_edit(ctx, "1")


def test_history_numbers_user_turns_on_one_line_each():
    ctx, out = context()
    cmd_history(ctx, "")
    assert out.getvalue().splitlines() == [
        "[1. you] first question", "[assistant] an answer",
        "[2. you] second question", "[assistant (interrupted)] cut"]  # fmt: skip


def test_set_shows_every_key_and_sets_one():
    ctx, out = context()
    cmd_set(ctx, "")
    rows = dict(line.split("\t") for line in out.getvalue().splitlines())
    assert list(rows) == list(SESSION_KEYS)
    assert (rows["drop_oldest"], rows["seed"], rows["system"]) == ("off", "none", "''")
    cmd_set(ctx, "system 'be brief'")
    cmd_set(ctx, "temperature 0.5")
    assert ctx.chat.options == {"system": "be brief", "temperature": 0.5}
    with pytest.raises(UsageError, match="unknown setting 'top_kk'"):
        cmd_set(ctx, "top_kk")


@pytest.mark.parametrize("key,said", [
    ("temperature", "temperature = 0.2: 0 is greedy (default 0.2; 0.0 to 5.0)"),
    ("drop_oldest", "drop_oldest = off: when over the context"),
    ("seed", "seed = none: a fixed sampling seed"),
    ("system", "system = '': system prompt"),
])  # fmt: skip
def test_set_with_a_key_alone_shows_its_value_and_what_it_takes(key, said):
    ctx, out = context()
    assert cmd_set(ctx, key) is None and cmd_set(ctx, key + "   ") is None
    first, again = out.getvalue().splitlines()
    assert first.startswith(said) and again == first
    assert ctx.chat.options == {}  # nothing changed


def test_set_answers_in_the_words_it_takes():
    ctx, out = context()
    for line in ("drop_oldest on", "drop_oldest off", "seed none", "seed 7", "top_p 0.5"):
        cmd_set(ctx, line)
    assert out.getvalue().splitlines() == [
        "drop_oldest = on for this session", "drop_oldest = off for this session",
        "seed = none for this session", "seed = 7 for this session",
        "top_p = 0.5 for this session"]  # fmt: skip
    assert ctx.chat.options == {"drop_oldest": False, "seed": 7, "top_p": 0.5}


def test_session_rows_join_the_store_and_the_snapshots():
    """tokens are the conversation's (the store's); cached, the last save's end, at most the
    conversation's tokens (a save longer than it: an /undo since); bytes, the session's chunks."""
    summaries = [SessionSummary("a1", "work", "Refactor", "m", 3, "c", "2025-01-02", 40),
                 SessionSummary("b2", None, "", "m", 0, "c", "2025-01-01", 0),
                 SessionSummary("c3", "undone", "", "m", 1, "c", "2025-01-01", 20)]  # fmt: skip
    chains = {"a1": [SimpleNamespace(end=16), SimpleNamespace(end=38)],
              "c3": [SimpleNamespace(end=31)]}  # fmt: skip
    sizes = {"a1": 4096, "c3": 100}
    chat = SimpleNamespace(
        summaries=lambda: summaries,
        on_disk=lambda sid: ((chains[sid][-1].end if sid in chains else 0), sizes.get(sid, 0)),
    )  # fmt: skip
    rows = session_rows(chat)  # type: ignore[arg-type]
    assert [(r.name, r.turns, r.tokens, r.cached_tokens, r.bytes_on_disk) for r in rows] == [
        ("work", 3, 40, 38, 4096), ("b2", 0, 0, 0, None), ("undone", 1, 20, 20, 100)]  # fmt: skip
    assert rows[1].as_dict()["id"] == "b2" and rows[1].as_dict()["bytes_on_disk"] == 0
