"""The command line's grammar: the flags, the prompt words, the subcommands, and how a first word
is told apart. No I/O beyond argparse's own usage errors and help (exit 2 and 0). The settings'
flags are made from their declaration (config.py), and their values parsed and checked there.

    kvrepl [flags] [PROMPT ...]     chat; with a prompt, answer it and exit
    kvrepl path [--config|--log]    a subcommand, when the first word names one

argparse cannot take both a free positional prompt and subcommands in one parser, so there are
two, and the first word decides, as llm's default command does: `path`, `sessions`, `export` and
`rm` run the subcommand; any other word starts a prompt; `kvrepl -- path` sends the word itself.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from kvrepl import __version__
from kvrepl.config import OPTIONS, Option, flag_name, option_value

API_KEY_ENV = "KVREPL_API_KEY"  # `kvrepl serve`'s key, when no --api-key
SUBCOMMANDS = ("path", "sessions", "export", "rm", "serve")
EPILOG = """\
subcommands (when the first word names one; `kvrepl -- WORD ...` sends the words as a prompt):
  path [--config|--log]            print where sessions are stored (or the config file, or
                                   the log that keeps the details of internal errors)
  sessions                         list sessions (--json: as a JSON array)
  export NAME [--format md|json]   write a session out
  rm NAME                          delete a session and its snapshots
  serve [--host H] [--port P] [--api-key KEY]
                                   an OpenAI-compatible HTTP server over the model and the
                                   same K/V pool (127.0.0.1:8080 by default)

A prompt is answered and kvrepl exits; text piped in comes first in the same message
(`cat notes.txt | kvrepl "summarise this"`), and before it the files of -f, each in a fenced
block under its name (`kvrepl -f notes.txt -f todo.md "what is left?"`). Without a
prompt, piped lines are messages or /commands, one a line (-f's files go with the first
message). When output is not a terminal, stdout holds only the answers (and what /commands
print); notices, stats and errors go to stderr; exit status 1 when a line failed."""


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The server's own flags (the model's and the sampling's are the settings')."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine)")  # fmt: skip
    g.add_argument("--port", type=int, default=8080,
                   help="the port (default 8080; 0: any free one, printed)")  # fmt: skip
    g.add_argument("--api-key", metavar="KEY", default=None, help="answer only requests that send "
                   f"'Authorization: Bearer KEY' (or set {API_KEY_ENV})")  # fmt: skip
    g.add_argument("--queue", type=int, default=8, metavar="N", help="requests that may wait "
                   "while one is answered; more get 503 (default 8)")  # fmt: skip
    g.add_argument("--max-body-kb", type=int, default=8192, metavar="KB", help="the largest "
                   "request body, in KiB; larger ones get 413 (default 8192)")  # fmt: skip


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"kvrepl {__version__}")
    p.add_argument("--store", metavar="DIR", help="where sessions live (default: the user's data "
                   "folder, `kvrepl path` prints it; or KVREPL_HOME)")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", "--continue", "--resume", dest="resume", action="store_true",
                   help="continue the most recent session, reusing its snapshot")  # fmt: skip
    g.add_argument("--session", metavar="NAME", help="continue session NAME (created when new)")
    p.add_argument("-f", "--file", dest="files", action="append", default=[], metavar="FILE",
                   help="put this text file into the message, before the prompt (or the first "
                   "message typed); repeat for more")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="one JSON object per answer on stdout (answer, finish_reason, stats, "
                   "session), for scripts")  # fmt: skip
    add_setting_flags(p)


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """A flag for each setting that declares one (config.py); its value is parsed and checked as
    `/set` does, and left None when not given, so that the config file and KVREPL_* show."""
    group = p.add_argument_group("settings", _settings_note())
    for opt in OPTIONS.values():
        if opt.flag is None:
            continue
        if opt.type is bool:
            group.add_argument(opt.flag, dest=opt.name, action="store_const",
                               const=not opt.default, help=opt.flag_help or opt.help)  # fmt: skip
            continue
        shown = opt.type in (int, float) and opt.default is not None
        text = f"{opt.help} (default {opt.default})" if shown else opt.help
        group.add_argument(opt.flag, dest=opt.name, type=_flag_type(opt), choices=opt.choices,
                           metavar=opt.metavar, help=text)  # fmt: skip


def _settings_note() -> str:
    renamed = [f"{o.flag}: {o.name}" for o in OPTIONS.values()
               if o.flag not in (None, flag_name(o.name))]  # fmt: skip
    unflagged = [o.name for o in OPTIONS.values() if o.flag is None]
    note = (
        f"Each flag sets the setting of its name, _ for - ({', '.join(renamed)}; no flag for "
        f"{', '.join(unflagged)}). The config file's keys and KVREPL_<NAME> variables set them "
        "too (top_p = 0.8, KVREPL_TOP_P=0.8); flags win over variables, variables over the file."
    )
    return textwrap.fill(note, 76)


def _flag_type(opt: Option) -> Callable[[str], Any]:
    def value(raw: str) -> Any:
        try:
            return option_value(opt, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return value


def chat_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvrepl",
        description="Chat with a local model; the KV cache survives turns, restarts and edits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    add_chat_flags(p)
    p.add_argument("prompt", nargs="*", help="answer this and exit (words are joined)")
    return p


def subcommand_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrepl")
    add_chat_flags(p)
    # --store is also taken after a subcommand (`kvrepl path --store DIR`).
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help="the store")
    sub = p.add_subparsers(dest="command", metavar="{path,sessions,export,rm,serve}",
                           required=True)  # fmt: skip
    path = sub.add_parser("path", parents=[store], help="print where sessions are stored")
    which = path.add_mutually_exclusive_group()
    which.add_argument("--config", action="store_true", help="print the config file's path")
    which.add_argument("--log", action="store_true",
                       help="print the log's path (the details of internal errors)")  # fmt: skip
    listing = sub.add_parser("sessions", parents=[store], help="list sessions")
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="one JSON array of the sessions")  # fmt: skip
    e = sub.add_parser("export", parents=[store], help="write a session out")
    e.add_argument("name")
    e.add_argument("--format", choices=("md", "json"), default="md")
    r = sub.add_parser("rm", parents=[store], help="delete a session and its snapshots")
    r.add_argument("name")
    serve = sub.add_parser("serve", parents=[store], argument_default=argparse.SUPPRESS,
                           help="an OpenAI-compatible HTTP server over the model")  # fmt: skip
    add_setting_flags(serve)  # SUPPRESS keeps the settings given before `serve`
    add_server_flags(serve)
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as a namespace: `command` is a subcommand's name or None (chat), `prompt`
    the prompt's words (empty: none)."""
    argv = list(argv)
    head = argv[: argv.index("--")] if "--" in argv else argv  # after `--`: prompt words only
    # A first pass without help or errors for unknown flags, only to find the first word.
    words = chat_parser(add_help=False).parse_known_intermixed_args(head)[0].prompt
    if words and words[0] in SUBCOMMANDS:
        args = subcommand_parser().parse_args(argv)
        args.prompt = []
        return args
    args = chat_parser().parse_intermixed_args(argv)
    args.command = None
    return args


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given)."""
    return {opt.name: getattr(args, opt.name) for opt in OPTIONS.values() if opt.flag}
