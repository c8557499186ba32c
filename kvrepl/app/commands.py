"""The built-in slash commands: one plain function `(ctx, arg) -> Outcome` per command, declared
with its name, usage, help, aliases and argument completion by the `@builtin` decorator beside it.
`build_registry()` fills a fresh `Registry` (registry.py: the machinery, re-exported here) with
them, in the order they are declared here, which is the order of `/help`.

Commands talk to `Conversation` and the `Renderer` and return what the REPL should do next: nothing,
quit, open the prompt prefilled, or render a turn. What a command shows is `info` (its output:
stdout) or `confirm` (what it did: a notice, stderr when piped). The session listing's rows are
gathered here, once, for `/sessions`, `/stats`, the exports and the `kvrepl sessions` subcommand
alike (`session_row`; what each figure counts is listing.py's).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrepl.app.export import FORMATS, export
from kvrepl.app.listing import SessionRow, format_size
from kvrepl.app.registry import (
    Command,
    CommandFunc,
    Context,
    Generate,
    Outcome,
    Prefill,
    Quit,
    Registry,
)
from kvrepl.app.userfiles import compose, names, read_file, write_file
from kvrepl.chat.conversation import Conversation
from kvrepl.config import SESSION_KEYS, parse_setting, refuse_unless_session, setting_help
from kvrepl.errors import KvreplError, UsageError
from kvrepl.store.records import SessionSummary

__all__ = ["BUILTINS", "Command", "Context", "Generate", "Outcome", "Prefill", "Quit",
           "Registry", "build_registry", "builtin", "session_row", "session_rows",
           "write_file"]  # fmt: skip

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
                          "answer or clears the line; Ctrl-D, /quit or q alone quits.")  # fmt: skip
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
    ctx.renderer.print_sessions(session_rows(ctx.chat), current=_current_name(ctx.chat),
                                pool_bytes=ctx.chat.pool_bytes())  # fmt: skip
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


@builtin("read", "[PATH]", "attach a text file to your next message, before what you type "
         "(Tab completes paths); alone: what is attached; --drop: forget it",
         completes="paths")  # fmt: skip
def cmd_read(ctx: Context, arg: str) -> Outcome:
    if not arg or arg == "--drop":
        if not ctx.attached:
            ctx.renderer.info("nothing attached: /read PATH attaches a file to your next message")
        elif arg:
            ctx.renderer.confirm(f"forgot {names(ctx.attached)}: nothing attached")
            ctx.attached.clear()
        else:
            ctx.renderer.info(f"attached for your next message: {names(ctx.attached)}")
        return None
    if not ctx.chat.model.ready():  # the file's tokens are counted with the model's tokenizer
        with ctx.renderer.status(ctx.chat.model.status()):
            ctx.chat.model.get()
    _, room = ctx.chat.measure("")
    file = read_file(_unquote(arg), room=room)
    n, _ = ctx.chat.measure(file.block())
    total, _ = ctx.chat.measure(compose([*ctx.attached, file], ""))
    if n > room:
        raise KvreplError(f"cannot read {file.name}: it is {n:,} tokens, and a message holds "
                          f"at most {room:,} in this model's context")  # fmt: skip
    if total > room:
        raise KvreplError(f"cannot read {file.name}: with {names(ctx.attached)} it makes "
                          f"{total:,} tokens, and a message holds at most {room:,} (/read --drop "
                          "forgets what is attached)")  # fmt: skip
    ctx.attached.append(file)
    ctx.renderer.confirm(f"attached {file.name} ({n:,} tokens): it goes with your next message")
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
    for b in ctx.chat.branches():
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
    now = ctx.chat.settings
    if not arg:
        rows = [(k, _shown(getattr(now, k))) for k in SESSION_KEYS]
        ctx.renderer.print_table(("key", "value"), rows)
        return None
    key, _, raw = arg.partition(" ")
    if not raw.strip():  # the value in force, and what the setting takes
        refuse_unless_session(key)
        ctx.renderer.info(f"{key} = {_shown(getattr(now, key))}: {setting_help(key)}")
        return None
    value = parse_setting(key, _unquote(raw))
    ctx.chat.sessions.set_option(key, value)
    ctx.renderer.confirm(f"{key} = {_shown(value)} for this session")
    return None


@builtin("stats", "", "this session's figures (as /sessions counts them), the model's cache and "
         "the totals of every answer computed")  # fmt: skip
def cmd_stats(ctx: Context, arg: str) -> Outcome:
    figures = ctx.chat.cache_figures()
    rows: list[tuple[str, str]] = [("session", ctx.chat.sessions.label or "(none yet)")]
    rows += [(label, str(figures[key])) for key, label in (("model", "model"),
             ("weights", "weights")) if key in figures]  # fmt: skip
    if ctx.chat.session is not None:
        rows += session_row(ctx.chat, ctx.chat.summary(ctx.chat.session)).figures()
    if "cached_tokens" in figures:
        rows += [("in memory", f"{figures['cached_tokens']:,} tokens in the model's cache now"),
                 ("context", f"{figures['context_length']:,} tokens")]  # fmt: skip
    if ctx.chat.session is not None:
        budget = format_size(figures["kv_budget_bytes"])
        rows += [("all sessions", f"{format_size(figures['kv_pool_bytes'])} of K/V on disk "
                  f"(of {budget} allowed)"),
                 ("answers", f"{figures['answers']:,} computed, every branch; over them:"),
                 *[(name, _fmt(figures[f"{name}_tokens"])) for name in
                   ("reused", "prefilled", "generated")],
                 ("mean ttft", f"{_fmt(figures['ttft_s'])} s"),
                 ("decode", f"{_fmt(figures['decode_tok_s'])} tok/s")]  # fmt: skip
    ctx.renderer.print_table(("figure", "value"), rows)
    return None


@builtin("export", "[md|json] [file]", "write this conversation out (to a file named .md or "
         ".json: its format)", completes=FORMATS)  # fmt: skip
def cmd_export(ctx: Context, arg: str) -> Outcome:
    fmt, target = _export_args(arg)
    session = ctx.chat.session
    if session is None:
        raise UsageError("nothing to export yet")
    row = session_row(ctx.chat, ctx.chat.summary(session))
    text = export(session, ctx.chat.transcript(session), fmt, row=row,
                  system=ctx.chat.settings.system)
    if target is not None:
        write_file(target, text)
        ctx.renderer.confirm(f"wrote {target}")
    elif fmt == "md":
        ctx.renderer.print_markdown(text)
    else:
        ctx.renderer.info(text)
    return None


def _export_args(arg: str) -> tuple[str, str | None]:
    """(format, file or None) of `/export [md|json] [file]`; a file named .md or .json alone
    says its format."""
    first, _, rest = arg.partition(" ")
    if not first:
        return "md", None
    if first in FORMATS:
        return first, _unquote(rest) or None
    target = _unquote(arg)
    suffix = Path(target).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix, target
    raise UsageError(f"format is md or json, not {first!r}")


# ---- helpers -------------------------------------------------------------------------------


def session_rows(chat: Conversation) -> list[SessionRow]:
    """One row per stored session, newest first: the one source of every session listing."""
    return [session_row(chat, s) for s in chat.summaries()]


def session_row(chat: Conversation, s: SessionSummary) -> SessionRow:
    """A session's figures, counted as listing.py says, for every surface that shows them."""
    saved, size = chat.on_disk(s.id)
    # The last save may hold more than the conversation has now (an /undo since): not cached.
    cached = min(saved, s.tokens) if s.tokens else saved
    return SessionRow(name=s.name or s.id, title=s.title, turns=s.turns, tokens=s.tokens,
                      cached_tokens=cached, updated=s.updated,
                      bytes_on_disk=size or None, id=s.id)  # fmt: skip


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


def _shown(value: Any) -> str:
    """A setting's value as /set takes it: on/off, none, text quoted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, str) else str(value)


def _fmt(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
