"""The command line: environment, streams, subcommands and exit codes (the grammar of its flags is
args.py's). Domain errors become one line on stderr here (exit 1; usage errors exit 2); in the
line loop and a one-shot prompt, exit 1 when any line failed; SIGTERM and SIGHUP stop a turn as
Ctrl-C does (what was generated is kept) and end kvrepl, exit 128 + the signal's number. No model
or database work of its own: it builds the rooms and hands over to the REPL or a subcommand.

    kvrepl [flags]                 chat (a new session; -c/--continue or --session NAME to go on)
    kvrepl [flags] PROMPT ...      answer PROMPT (after any -f FILE and piped text) and exit
    kvrepl path [--config|--log]   print where sessions are stored (or the config file, the log)
    kvrepl sessions                list sessions (--json: as one JSON array)
    kvrepl export NAME [--format md|json]
    kvrepl rm NAME

Streams: in a terminal everything is on the screen. When stdout is not a terminal (or --json),
stdout holds the answers alone (what /commands print too, except under --json); notices, stats
and errors go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrepl.app.args import flag_settings, parse
from kvrepl.chat.guards import Terminated, ending_signals
from kvrepl.config import Settings, config_path, load_settings, store_path
from kvrepl.errors import KvreplError, UsageError
from kvrepl.store.names import validate_session_name


def entry() -> None:
    """The `kvrepl` command. A model still loading in its thread when kvrepl ends would make
    the C++ runtime abort at interpreter shutdown ("terminate called…"): leave at once instead,
    once output is flushed (everything is already committed to disk)."""
    from kvrepl.chat.handle import loading_in_background

    code = main()
    if loading_in_background():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    with ending_signals():
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: Sequence[str]) -> int:
    args = parse(argv)
    home = store_path(args.store)
    try:
        if args.session is not None:  # refused before any model work
            validate_session_name(args.session)
        settings = _checked(load_settings(flag_settings(args)), args)
        if args.command == "path":
            print(_path(args, home))
            return 0
        if args.command == "serve":
            from kvrepl.app import server

            return server.run(args, settings, home)
        return _run(args, settings, home)
    except UsageError as exc:
        print(f"kvrepl: {exc}", file=sys.stderr)
        return 2
    except KvreplError as exc:
        print(f"kvrepl: {exc}", file=sys.stderr)
        return 1
    except Terminated as exc:
        print(f"kvrepl: ended by {exc.name}; everything is saved", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130


def _path(args: argparse.Namespace, home: Path) -> Path:
    if args.log:
        from kvrepl.app.repl import log_path

        return log_path(home)
    return config_path() if args.config else home


def _checked(settings: Settings, args: argparse.Namespace) -> Settings:
    """The device's form checked before a session is opened or created (torch would answer a
    bad one with its list of every device type, once the model loads). `--think` shows the
    thinking and switches the model's thinking mode on, as `/think on` does (unless the
    thinking setting says otherwise)."""
    from kvrepl.engine.devices import check_device

    check_device(settings.device)
    if settings.show_think and settings.thinking is None:
        settings = dataclasses.replace(settings, thinking=True)
    return settings


def _run(args: argparse.Namespace, settings: Settings, home: Path) -> int:
    from kvrepl.app.commands import build_registry
    from kvrepl.app.repl import Repl, interactive_loop, line_loop, stdin_lines
    from kvrepl.chat.conversation import Conversation
    from kvrepl.chat.handle import ModelHandle

    if args.command in ("sessions", "export", "rm"):
        renderer = _renderer(settings, split=not sys.stdout.isatty())
        chat = Conversation.at(home, settings, ModelHandle.none(settings))
        try:
            return _subcommand(args, chat, renderer)
        finally:
            chat.close()

    files = _read_files(args.files, settings)  # first: a file that cannot be sent stores nothing
    prompt = _one_shot(args.prompt)
    split = args.json or not sys.stdout.isatty()
    renderer = _renderer(settings, split=split, json_lines=args.json)
    interactive = prompt is None and not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    model = ModelHandle(settings)
    chat = Conversation.at(home, settings, model)
    try:
        created = _open_session(chat, args)  # first: a wrong name fails before model work
        model.prepare(renderer.notice)
        if not interactive:  # else once the prompt is drawn: its imports would slow it down
            model.start()
        repl = Repl(chat, renderer, build_registry(), interactive=interactive)
        repl.ctx.attached.extend(files)  # they go with the prompt, or the first message
        if chat.session is not None:
            renderer.notice(_opened_line(chat, created))
            if note := chat.sessions.unanswered_note():
                renderer.notice(note)
        if prompt is not None:
            repl.send(prompt)
            return 1 if repl.failures else 0
        if not interactive:
            return line_loop(repl, stdin_lines())
        renderer.notice("kvrepl: /help for commands, Ctrl-D to quit")
        return interactive_loop(
            repl, home, toolbar=lambda: _toolbar(chat, repl.ctx.attached), on_drawn=model.start
        )
    finally:
        chat.close()


def _renderer(settings: Settings, *, split: bool, json_lines: bool = False) -> Any:
    """The renderer: plain when stdout is not a terminal; with `split`, answers on stdout and the
    rest (notices, stats, errors) on stderr."""
    from kvrepl.app.render import make_console
    from kvrepl.app.renderers import make_renderer

    plain = settings.plain or split or not sys.stdout.isatty()
    err = make_console(sys.stderr, plain=True) if split else None
    return make_renderer(make_console(plain=plain), err=err, json_lines=json_lines,
                         show_think=settings.show_think, plain=plain)  # fmt: skip


def _one_shot(words: list[str]) -> str | None:
    """The one-shot prompt, None without one. Text piped in comes first, then the prompt, in one
    message (as llm does), so that `cat notes.txt | kvrepl "summarise this"` works."""
    if not words:
        return None
    prompt = " ".join(words)
    if sys.stdin is None or sys.stdin.isatty():
        return prompt
    from kvrepl.app.repl import stdin_lines

    piped = "".join(stdin_lines()).rstrip()
    return f"{piped}\n\n{prompt}" if piped.strip() else prompt


def _open_session(chat: Any, args: argparse.Namespace) -> bool:
    """Open the session the flags name; whether it was created now."""
    if args.resume:
        chat.sessions.resume_latest()
    elif args.session is not None:
        created = chat.find_session(args.session) is None
        chat.sessions.open_or_create(args.session)
        return created
    return False


def _opened_line(chat: Any, created: bool) -> str:
    """What the open session is: new, or how many turns it has."""
    if created:
        return f"new session {chat.sessions.label}"
    turns = len(chat.sessions.user_turns())
    return f"session {chat.sessions.label}: {f'{turns} turn(s)' if turns else 'no turns yet'}"


def _toolbar(chat: Any, attached: list[Any]) -> str:
    from kvrepl.app.userfiles import names

    parts = [chat.model.status()]
    if chat.session is not None:
        parts.append(f"session {chat.sessions.label}")
    if (cached := chat.model.cached_tokens()) is not None:
        parts.append(f"{cached:,} tokens cached")
    if attached:
        parts.append(f"{names(attached)} attached")
    return " · ".join(parts)


def _read_files(files: list[str], settings: Settings) -> list[Any]:
    """The files of `-f`, read before anything is stored or loaded; one that cannot be read or
    is far larger than the context can hold is one line (exit 1). Whether they fit the context
    is checked with the message, once the model is loaded."""
    from kvrepl.app.userfiles import BYTES_PER_TOKEN, MAX_BYTES, read_file

    most = BYTES_PER_TOKEN * settings.context if settings.context else MAX_BYTES
    return [read_file(name, max_bytes=most) for name in files]


def _subcommand(args: argparse.Namespace, chat: Any, renderer: Any) -> int:
    from kvrepl.app.commands import session_row, session_rows
    from kvrepl.app.export import export

    if args.command == "sessions":
        rows = session_rows(chat)
        if args.json:
            print(json.dumps([r.as_dict() for r in rows], ensure_ascii=False))
        else:
            renderer.print_sessions(rows, pool_bytes=chat.pool_bytes())
        return 0
    session = chat.find_session(args.name)
    if session is None:
        raise UsageError(f"no session {args.name!r}")
    if args.command == "export":
        row = session_row(chat, chat.summary(session))
        sys.stdout.write(export(session, chat.transcript(session), args.format, row=row))
        return 0
    chat.delete(session.id)  # refused while another kvrepl holds it
    renderer.info(f"deleted {args.name}")
    return 0
