"""The built-in slash commands: one plain function `(ctx, arg) -> Outcome` per command, declared
with its name, usage, help, aliases and argument completion by the `@builtin` decorator beside it.
`build_registry()` fills a fresh `Registry` (registry.py: the machinery, re-exported here) with
them, in the order they are declared here, which is the order of `/help`.

Commands talk to `Conversation` and the `Renderer` and return what the REPL should do next: nothing,
quit, open the prompt prefilled, or render a turn. What a command shows is `info` (its output:
stdout) or `confirm` (what it did: a notice, stderr when piped). The session listing's rows are
gathered here, once, for `/sessions` and the `kvrepl sessions` subcommand alike (`session_rows`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrepl.chat import Conversation
from kvrepl.config import SESSION_KEYS, parse_setting
from kvrepl.errors import UsageError
from kvrepl.export import FORMATS, export
from kvrepl.listing import SessionRow
from kvrepl.registry import (
    Command,
    CommandFunc,
    Context,
    Generate,
    Outcome,
    Prefill,
    Quit,
    Registry,
)

__all__ = ["BUILTINS", "Command", "Context", "Generate", "Outcome", "Prefill", "Quit",
           "Registry", "build_registry", "builtin", "session_rows"]  # fmt: skip

# Every built-in command, in the order declared (the order of /help).
BUILTINS: list[Command] = []


def builtin(
    name: str,
    usage: str = "",
    help: str = "",
    *,
    aliases: tuple[str, ...] = (),
    completes: tuple[str, ...] | str = (),
) -> Callable[[CommandFunc], CommandFunc]:
    """Declare the function below as the built-in command `/name`; it stays a plain function."""

    def declare(func: CommandFunc) -> CommandFunc:
        BUILTINS.append(Command(name, func, usage, help, aliases, completes))
        return func

    return declare


def build_registry() -> Registry:
    """A fresh registry with every built-in command (adding to it changes no other registry)."""
    reg = Registry()
    for cmd in BUILTINS:
        reg.add(cmd)
    return reg


# ---- the commands --------------------------------------------------------------------------


@builtin("help", "[command]", "list the commands, or show one", aliases=("?",))
def cmd_help(ctx: Context, arg: str) -> Outcome:
    cmds = [ctx.registry.find(arg.lstrip("/"))] if arg else list(ctx.registry.commands.values())
    if None in cmds:
        raise UsageError(f"no command {arg}")
    rows = [(c.signature, c.help + (f" (also /{', /'.join(c.aliases)})" if c.aliases else ""))
            for c in cmds if c]  # fmt: skip
    ctx.renderer.print_table(("command", "what it does"), rows)
    if not arg:
        ctx.renderer.info("Enter sends; Alt-Enter or Ctrl-J adds a line; Ctrl-C stops an "
                          "answer or clears the line; Ctrl-D quits.")  # fmt: skip
    return None


@builtin("quit", "", "leave (everything is saved)", aliases=("exit", "q"))
def cmd_quit(ctx: Context, arg: str) -> Outcome:
    return Quit()


@builtin("new", "[name]", "start a new session")
def cmd_new(ctx: Context, arg: str) -> Outcome:
    ctx.chat.sessions.new_session(arg or None)
    ctx.renderer.confirm(f"new session{f' {arg!r}' if arg else ''}")
    return None


@builtin("save", "[name]", "name or rename this session (it is already autosaved)")
def cmd_save(ctx: Context, arg: str) -> Outcome:
    if not arg:
        s = ctx.chat.session
        ctx.renderer.confirm(f"saved as {s.name or s.id}" if s else "nothing to save yet")
        return None
    session = ctx.chat.sessions.rename(arg)
    ctx.renderer.confirm(f"saved as {session.name!r}")
    return None


@builtin("load", "name", "switch to a session, reusing its KV snapshot", completes="sessions")
def cmd_load(ctx: Context, arg: str) -> Outcome:
    if not arg:
        raise UsageError("which session?")
    session = ctx.chat.sessions.open(arg)
    with ctx.renderer.status("restoring the cache…"):
        reused, recomputed, notes = ctx.chat.warm()
    for line in notes:
        ctx.renderer.notice(line)
    if note := ctx.chat.sessions.unanswered_note():
        ctx.renderer.notice(note)
    turns = len(ctx.chat.sessions.user_turns())
    ctx.renderer.confirm(f"loaded {session.name or session.id}: {turns} turn(s); reused "
                         f"{reused:,} tokens, recomputed {recomputed:,}")  # fmt: skip
    return None


@builtin("sessions", "", "list sessions")
def cmd_sessions(ctx: Context, arg: str) -> Outcome:
    ctx.renderer.print_sessions(session_rows(ctx.chat), current=_current_name(ctx.chat))
    return None


@builtin("think", "[on|off]", "show or hide thinking; on/off also switches the model's "
         "thinking mode where its template has one", completes=("on", "off"))  # fmt: skip
def cmd_think(ctx: Context, arg: str) -> Outcome:
    if arg not in ("", "on", "off"):
        raise UsageError(f"/think takes on or off, not {arg!r}")
    show = (not ctx.renderer.show_think) if not arg else arg == "on"
    ctx.renderer.show_think = show
    line = f"thinking {'shown' if show else 'hidden'}"
    if arg:
        ctx.chat.sessions.set_option("thinking", arg == "on")
        switch = ctx.chat.thinking_switch()
        if switch is None:
            line += f"; thinking mode {arg} where the model's template has a switch"
        elif not switch:
            line += " (this model's template has no thinking switch)"
        else:
            line += f"; thinking mode {arg}"
    ctx.renderer.confirm(line)
    return None


@builtin("edit", "N [text]", "replace user turn N as a new branch; without text, edit it in "
         "the prompt")  # fmt: skip
def cmd_edit(ctx: Context, arg: str) -> Outcome:
    num, _, text = arg.partition(" ")
    if not num.isdigit():
        raise UsageError("give the turn number (see /history)")
    n = int(num)
    if text.strip():
        return Generate(ctx.chat.edit(n, text))
    old = ctx.chat.sessions.user_turn(n).content
    if not ctx.interactive:
        raise UsageError("give the new text after the turn number")
    return Prefill(old, lambda new: Generate(ctx.chat.edit(n, new)))


@builtin("retry", "", "answer the last message again (a new branch)")
def cmd_retry(ctx: Context, arg: str) -> Outcome:
    return Generate(ctx.chat.retry())


@builtin("undo", "", "drop the last exchange from this branch (kept in the database)")
def cmd_undo(ctx: Context, arg: str) -> Outcome:
    left = ctx.chat.undo()
    ctx.renderer.confirm(f"dropped the last exchange; {left} turn(s) left")
    return None


@builtin("history", "", "the turns of this branch, numbered")
def cmd_history(ctx: Context, arg: str) -> Outcome:
    n = 0
    for m in ctx.chat.history():
        if m.role == "user":
            n += 1
        label = (
            f"{n}. you"
            if m.role == "user"
            else m.role + (" (interrupted)" if m.interrupted else "")
        )
        ctx.renderer.info(f"[{label}] {_one_line(m.content)}")
    if n == 0:
        ctx.renderer.info("no turns yet")
    return None


@builtin("branches", "", "every branch of this session (edits and retries)")
def cmd_branches(ctx: Context, arg: str) -> Outcome:
    if ctx.chat.session is None:
        ctx.renderer.info("no branches yet")
        return None
    rows = []
    for b in ctx.chat.store.branches(ctx.chat.session.id):
        # Where a branch leaves the active one says what it is (an edit, a retry).
        at = b.diverges or b.leaf
        who = "you" if at.role == "user" else at.role
        what = "(the active branch)" if b.active else f"{who}: {_one_line(at.content, 46)}"
        rows.append(("*" if b.active else "", b.leaf.id, b.length, b.shared, what))
    ctx.renderer.print_table(("", "id", "messages", "shared", "differs at"), rows)
    ctx.renderer.info("/branch ID switches to one")
    return None


@builtin("branch", "ID", "switch to a branch (see /branches)", completes="branches")
def cmd_branch(ctx: Context, arg: str) -> Outcome:
    if not arg.isdigit():
        raise UsageError("give a branch id from /branches")
    ctx.chat.switch_branch(int(arg))
    ctx.renderer.confirm(f"on branch {arg}: {len(ctx.chat.sessions.user_turns())} turn(s)")
    return None


@builtin("set", "[key value]", "show or change sampling and the system prompt for this "
         "session", completes=tuple(SESSION_KEYS))  # fmt: skip
def cmd_set(ctx: Context, arg: str) -> Outcome:
    if not arg:
        s = ctx.chat.settings
        ctx.renderer.print_table(("key", "value"), [(k, repr(getattr(s, k))) for k in SESSION_KEYS])
        return None
    key, _, raw = arg.partition(" ")
    if not raw and key != "system":
        raise UsageError(f"give a value for {key}")
    value = parse_setting(key, _unquote(raw))
    ctx.chat.sessions.set_option(key, value)
    ctx.renderer.confirm(f"{key} = {value!r} for this session")
    return None


@builtin("stats", "", "this session's cache and turn figures")
def cmd_stats(ctx: Context, arg: str) -> Outcome:
    figures = ctx.chat.cache_figures()
    ctx.renderer.print_table(("figure", "value"), [(k, _fmt(v)) for k, v in figures.items()])
    return None


@builtin("export", "[md|json] [file]", "write this conversation out", completes=FORMATS)
def cmd_export(ctx: Context, arg: str) -> Outcome:
    parts = arg.split(maxsplit=1)
    fmt = parts[0] if parts else "md"
    if fmt not in FORMATS:
        raise UsageError(f"format is md or json, not {fmt!r}")
    if ctx.chat.session is None:
        raise UsageError("nothing to export yet")
    text = export(ctx.chat.store, ctx.chat.session, fmt)
    if len(parts) > 1:
        Path(parts[1]).expanduser().write_text(text, encoding="utf-8")
        ctx.renderer.confirm(f"wrote {parts[1]}")
    elif fmt == "md":
        ctx.renderer.print_markdown(text)
    else:
        ctx.renderer.info(text)
    return None


# ---- helpers -------------------------------------------------------------------------------


def session_rows(chat: Conversation) -> list[SessionRow]:
    """One row per stored session, newest first, with its snapshot's tokens and size: the one
    source of every session listing."""
    rows = []
    for s in chat.store.list_sessions():
        rows.append(SessionRow(
            name=s.name or s.id, title=s.title, turns=s.turns,
            tokens=chat.kv.n_tokens_on_disk(s.id), updated=s.updated,
            snapshot_bytes=chat.kv.size_bytes(s.id),
        ))  # fmt: skip
    return rows


def _current_name(chat: Conversation) -> str | None:
    return chat.sessions.label or None


def _one_line(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return shlex.split(raw)[0]
    return raw


def _fmt(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
