"""The command line: flags, environment, subcommands and exit codes. Domain errors become one
line on stderr here (exit 1; usage errors exit 2). No model or database work of its own: it builds
the rooms and hands over to the REPL or a subcommand.

    kvrepl [flags]                 chat (a new session; --resume or --session NAME to continue)
    kvrepl path [--config]         print where sessions are stored (or the config file)
    kvrepl sessions                list sessions
    kvrepl export NAME [--format md|json]
    kvrepl rm NAME
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrepl import __version__
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrepl", description="Chat with a local model; the KV cache "
                                "survives turns, restarts and edits.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"kvrepl {__version__}")
    p.add_argument(
        "--model", help="embedded default, a model folder, a .gguf file or a cached hub id"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "gguf", "float32", "bfloat16", "float16"),
        help="auto: a .gguf runs its own quantized weights on the CPU (gguf); float32: dequantized",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file")
    p.add_argument(
        "--store", metavar="DIR", help="where sessions live (default: the user's data folder)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the most recent session")
    g.add_argument("--session", metavar="NAME", help="continue session NAME (created when new)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default 0.2)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-reuse", action="store_true", help="recompute the whole prompt every turn")
    p.add_argument("--think", action="store_true", default=None, help="show thinking")
    p.add_argument(
        "--drop-oldest",
        action="store_true",
        default=None,
        help="when over the context, leave out the oldest turns (and say so)",
    )
    p.add_argument("--plain", action="store_true", default=None, help="no colours, no Markdown")
    # --store is also taken after a subcommand (`kvrepl path --store DIR`).
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help="the store")
    sub = p.add_subparsers(dest="command", metavar="{path,sessions,export,rm}")
    path = sub.add_parser("path", parents=[store], help="print where sessions are stored")
    path.add_argument("--config", action="store_true", help="print the config file's path")
    sub.add_parser("sessions", parents=[store], help="list sessions")
    e = sub.add_parser("export", parents=[store], help="write a session out")
    e.add_argument("name")
    e.add_argument("--format", choices=("md", "json"), default="md")
    r = sub.add_parser("rm", parents=[store], help="delete a session and its snapshots")
    r.add_argument("name")
    return p


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "dtype": args.dtype, "device": args.device,
        "chat_template": args.chat_template, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "max_tokens": args.max_tokens,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed, "system": args.system,
        "reuse": False if args.no_reuse else None, "show_think": args.think,
        "drop_oldest": args.drop_oldest, "plain": args.plain,
    }  # fmt: skip


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
    args = build_parser().parse_args(argv)
    home = store_path(args.store)
    try:
        if args.session is not None:  # refused before any model work
            validate_session_name(args.session)
        settings = load_settings(_flags(args))
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
    from kvrepl.render import Renderer, make_console
    from kvrepl.repl import Repl, interactive_loop, line_loop, stdin_lines
    from kvrepl.store import Store

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    plain = settings.plain or not sys.stdout.isatty()
    console = make_console(plain=plain)
    renderer = Renderer(console, show_think=settings.show_think, plain=plain)
    store = Store(home / "kvrepl.db")
    if args.command in ("sessions", "export", "rm"):
        return _subcommand(args, Chat(settings, store, None, _no_model, home), renderer)

    from kvrepl import models

    loader = BackgroundModel(settings, progress=False)
    chat = Chat(settings, store, None, loader.get, home)
    try:
        if args.resume:  # the session first: a wrong name fails before any model work
            chat.resume_latest()
        elif args.session is not None:
            chat.open_or_create(args.session)
        source = models.resolve(settings.model)
        if note := models.first_start(source, settings.dtype, settings.device):
            # Once per GGUF file, before the prompt: its progress bar would tear the input.
            renderer.notice(note)
            models.prepare(source, settings.dtype, settings.device, progress=True)
        loader.start()
        repl = Repl(
            chat, renderer, build_registry(), interactive=interactive, model_ready=loader.ready
        )
        if chat.session is not None:
            turns = len(chat.user_turns())
            renderer.notice(f"session {chat.session.name or chat.session.id}: {turns} turn(s)")
            if note := chat.unanswered_note():
                renderer.notice(note)
        if not interactive:
            return line_loop(repl, stdin_lines())
        renderer.notice("kvrepl: /help for commands, Ctrl-D to quit")
        return interactive_loop(repl, home, toolbar=lambda: _toolbar(loader, chat))
    finally:
        chat.close()
        store.close()


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
