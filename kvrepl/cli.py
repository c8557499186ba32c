"""The command line: environment, streams, subcommands and exit codes (the grammar of its flags is
args.py's). Domain errors become one line on stderr here (exit 1; usage errors exit 2); in the
line loop and a one-shot prompt, exit 1 when any line failed. No model or database work of its
own: it builds the rooms and hands over to the REPL or a subcommand.

    kvrepl [flags]                 chat (a new session; -c/--continue or --session NAME to go on)
    kvrepl [flags] PROMPT ...      answer PROMPT (after any piped text) and exit
    kvrepl path [--config]         print where sessions are stored (or the config file)
    kvrepl sessions                list sessions
    kvrepl export NAME [--format md|json]
    kvrepl rm NAME

Streams: in a terminal everything is on the screen. When stdout is not a terminal (or --json),
stdout holds the answers alone (what /commands print too, except under --json); notices, stats
and errors go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrepl.args import flag_settings, parse
from kvrepl.config import Settings, config_path, load_settings, store_path
from kvrepl.errors import KvreplError, UsageError
from kvrepl.names import validate_session_name


class BackgroundModel:
    """Loads the model in a thread while the user types; `get()` waits and re-raises errors."""

    def __init__(self, settings: Settings, progress: bool) -> None:
        self.settings = settings
        self.progress = progress
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)

    def start(self) -> BackgroundModel:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            from kvrepl.chat import Runtime
            from kvrepl.models import load

            s = self.settings
            template = (
                Path(s.chat_template).read_text(encoding="utf-8") if s.chat_template else None
            )
            loaded = load(s.model, device=s.device, dtype=s.dtype, chat_template=template,
                          progress=self.progress)  # fmt: skip
            self._result = Runtime.build(loaded, s)
        except BaseException as exc:  # handed to the thread that waits
            self._error = exc
        finally:
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def get(self) -> Any:
        self._done.wait()
        if self._error is not None:
            if isinstance(self._error, KvreplError):
                raise self._error
            raise KvreplError(f"the model failed to load: {self._error}") from self._error
        return self._result

    def status(self) -> str:
        if not self.ready():
            return "loading the model…"
        if self._error is not None:
            return "the model failed to load"
        return self._result.loaded.source.label


def entry() -> None:
    """The `kvrepl` command. A model still loading in its thread when kvrepl ends would make
    the C++ runtime abort at interpreter shutdown ("terminate called…"): leave at once instead,
    once output is flushed (everything is already committed to disk)."""
    code = main()
    if any(t.name == "model-loader" and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    home = store_path(args.store)
    try:
        if args.session is not None:  # refused before any model work
            validate_session_name(args.session)
        settings = load_settings(flag_settings(args))
        if args.command == "path":
            print(config_path() if args.config else home)
            return 0
        return _run(args, settings, home)
    except UsageError as exc:
        print(f"kvrepl: {exc}", file=sys.stderr)
        return 2
    except KvreplError as exc:
        print(f"kvrepl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, settings: Settings, home: Path) -> int:
    from kvrepl.chat import Chat
    from kvrepl.commands import build_registry
    from kvrepl.repl import Repl, interactive_loop, line_loop, stdin_lines
    from kvrepl.store import Store

    store = Store(home / "kvrepl.db")
    if args.command in ("sessions", "export", "rm"):
        renderer = _renderer(settings, split=False)
        return _subcommand(args, Chat(settings, store, None, _no_model, home), renderer)

    prompt = _one_shot(args.prompt)
    split = args.json or not sys.stdout.isatty()
    renderer = _renderer(settings, split=split, json_lines=args.json)
    interactive = prompt is None and not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    loader = BackgroundModel(settings, progress=False)
    chat = Chat(settings, store, None, loader.get, home)
    try:
        _open_session(chat, args)  # the session first: a wrong name fails before model work
        _first_start(settings, renderer)
        loader.start()
        repl = Repl(
            chat, renderer, build_registry(), interactive=interactive, model_ready=loader.ready
        )
        if chat.session is not None:
            turns = len(chat.user_turns())
            renderer.notice(f"session {chat.session.name or chat.session.id}: {turns} turn(s)")
            if note := chat.unanswered_note():
                renderer.notice(note)
        if prompt is not None:
            repl.send(prompt)
            return 1 if repl.failures else 0
        if not interactive:
            return line_loop(repl, stdin_lines())
        renderer.notice("kvrepl: /help for commands, Ctrl-D to quit")
        return interactive_loop(repl, home, toolbar=lambda: _toolbar(loader, chat))
    finally:
        chat.close()
        store.close()


def _renderer(settings: Settings, *, split: bool, json_lines: bool = False) -> Any:
    """The renderer: plain when stdout is not a terminal; with `split`, answers on stdout and the
    rest (notices, stats, errors) on stderr."""
    from kvrepl.render import make_console, make_renderer

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
    from kvrepl.repl import stdin_lines

    piped = "".join(stdin_lines()).rstrip()
    return f"{piped}\n\n{prompt}" if piped.strip() else prompt


def _open_session(chat: Any, args: argparse.Namespace) -> None:
    if args.resume:
        chat.resume_latest()
    elif args.session is not None:
        chat.open_or_create(args.session)


def _first_start(settings: Settings, renderer: Any) -> None:
    """Once per GGUF file, before the prompt: its progress bar (on stderr) would tear the input."""
    from kvrepl import models

    source = models.resolve(settings.model)
    if note := models.first_start(source, settings.dtype, settings.device):
        renderer.notice(note)
        models.prepare(source, settings.dtype, settings.device, progress=True)


def _toolbar(loader: BackgroundModel, chat: Any) -> str:
    parts = [loader.status()]
    if chat.session is not None:
        parts.append(f"session {chat.session.name or chat.session.id}")
    if loader.ready() and chat._rt is not None:
        parts.append(f"{len(chat._rt.engine.pc.ids):,} tokens cached")
    return " · ".join(parts)


def _no_model() -> Any:
    raise UsageError("this command does not load a model")


def _subcommand(args: argparse.Namespace, chat: Any, renderer: Any) -> int:
    from kvrepl.commands import session_rows
    from kvrepl.export import export

    if args.command == "sessions":
        renderer.print_sessions(session_rows(chat))
        return 0
    session = chat.store.get_session(args.name)
    if session is None:
        raise UsageError(f"no session {args.name!r}")
    if args.command == "export":
        sys.stdout.write(export(chat.store, session, args.format))
        return 0
    chat.delete(session.id)  # refused while another kvrepl holds it
    renderer.info(f"deleted {args.name}")
    return 0
