"""The REPL's input helpers: key bindings (one factory) and the completer for slash commands,
their arguments, session names and paths. Part of the REPL room, kept apart so repl.py stays
the loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.key_binding import KeyBindings

from kvrepl.app.commands import Registry


def make_key_bindings() -> KeyBindings:
    """Enter sends; Alt-Enter and Ctrl-J add a line (a paste stays one message by itself)."""
    kb = KeyBindings()

    @kb.add("escape", "enter")
    @kb.add("c-j")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return kb


class SlashCompleter(Completer):
    """Completes `/command` names, then the command's first argument: a fixed list, session
    names, branch ids, or a path (prompt-toolkit's PathCompleter over the argument)."""

    def __init__(self, registry: Registry, chat: Any) -> None:
        self.registry, self.chat = registry, chat
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        name, space, arg = text[1:].partition(" ")
        if not space:
            for candidate in self.registry.names():
                if candidate.startswith(name):
                    cmd = self.registry.find(candidate)
                    yield Completion(
                        "/" + candidate, -len(text), display_meta=cmd.help if cmd else ""
                    )
            return
        cmd = self.registry.find(name)
        if cmd is not None and cmd.completes == "paths":  # a path may hold spaces
            yield from self._paths.get_completions(Document(arg, len(arg)), event)
            return
        if cmd is None or " " in arg:
            return
        for option in self._options(cmd.completes):
            if option.startswith(arg):
                yield Completion(option, -len(arg))

    def _options(self, completes: tuple[str, ...] | str) -> list[str]:
        try:
            if completes == "sessions":
                return [s.name or s.id for s in self.chat.summaries()]
            if completes == "branches":
                return [str(b.leaf.id) for b in self.chat.branches()]
        except Exception:  # completion must never break typing
            return []
        return list(completes) if isinstance(completes, tuple) else []
