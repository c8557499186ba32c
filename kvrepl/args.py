"""The command line's grammar: the flags, the prompt words, the subcommands, and how a first word
is told apart. No I/O beyond argparse's own usage errors and help (exit 2 and 0).

    kvrepl [flags] [PROMPT ...]     chat; with a prompt, answer it and exit
    kvrepl path [--config]          a subcommand, when the first word names one

argparse cannot take both a free positional prompt and subcommands in one parser, so there are
two, and the first word decides, as llm's default command does: `path`, `sessions`, `export` and
`rm` run the subcommand; any other word starts a prompt; `kvrepl -- path` sends the word itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from kvrepl import __version__

SUBCOMMANDS = ("path", "sessions", "export", "rm")
EPILOG = """\
subcommands (when the first word names one; `kvrepl -- WORD ...` sends the words as a prompt):
  path [--config]                  print where sessions are stored (or the config file)
  sessions                         list sessions
  export NAME [--format md|json]   write a session out
  rm NAME                          delete a session and its snapshots

A prompt is answered and kvrepl exits; text piped in comes first in the same message
(`cat notes.txt | kvrepl "summarise this"`). Without a prompt, piped lines are messages or
/commands, one a line. When output is not a terminal, stdout holds only the answers (and what
/commands print); notices, stats and errors go to stderr; exit status 1 when a line failed."""


def add_chat_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--store", metavar="DIR", help="where sessions live (default: the user's data "
                   "folder, `kvrepl path` prints it; or KVREPL_HOME)")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", "--continue", "--resume", dest="resume", action="store_true",
                   help="continue the most recent session, reusing its snapshot")  # fmt: skip
    g.add_argument("--session", metavar="NAME", help="continue session NAME (created when new)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per answer on stdout (answer, finish_reason, stats, "
                   "session), for scripts")  # fmt: skip
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
    sub = p.add_subparsers(dest="command", metavar="{path,sessions,export,rm}", required=True)
    path = sub.add_parser("path", parents=[store], help="print where sessions are stored")
    path.add_argument("--config", action="store_true", help="print the config file's path")
    sub.add_parser("sessions", parents=[store], help="list sessions")
    e = sub.add_parser("export", parents=[store], help="write a session out")
    e.add_argument("name")
    e.add_argument("--format", choices=("md", "json"), default="md")
    r = sub.add_parser("rm", parents=[store], help="delete a session and its snapshots")
    r.add_argument("name")
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
    return {
        "model": args.model, "dtype": args.dtype, "device": args.device,
        "chat_template": args.chat_template, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "max_tokens": args.max_tokens,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed, "system": args.system,
        "reuse": False if args.no_reuse else None, "show_think": args.think,
        "drop_oldest": args.drop_oldest, "plain": args.plain,
    }  # fmt: skip
