"""The slash-command machinery: what a command is (`Command`), what it gets (`Context`), what it
returns (`Outcome`: nothing, `Quit`, `Prefill` or `Generate`) and the `Registry` that finds one by
name or alias and dispatches a `/command args` line to it.

Knows no command itself: the built-in ones are declared in commands.py, which fills a fresh
Registry with them (`build_registry`). The REPL dispatches through a registry and generates
`/help` and completion from it; it never compares command names itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvrepl.app.userfiles import Attachment
from kvrepl.chat.turn import Turn
from kvrepl.errors import UsageError

if TYPE_CHECKING:
    from kvrepl.app.render import Renderer
    from kvrepl.chat.conversation import Conversation


@dataclass(frozen=True)
class Quit:
    """Leave the REPL (everything is already saved)."""


@dataclass(frozen=True)
class Prefill:
    """Open the prompt with `text` in it; what the user submits goes to `then`."""

    text: str
    then: Callable[[str], Any]


@dataclass(frozen=True)
class Generate:
    """Render this turn as an answer."""

    turn: Turn


Outcome = Quit | Prefill | Generate | None


@dataclass
class Context:
    """What a command works on: the conversation, the output, and the registry (for /help);
    and the files read for the next message (`/read`, `-f`), which it takes when it is sent."""

    chat: Conversation
    renderer: Renderer
    registry: Registry
    interactive: bool = True  # False in line mode: no prefilled prompt
    attached: list[Attachment] = field(default_factory=list)


CommandFunc = Callable[[Context, str], Outcome]


@dataclass(frozen=True)
class Command:
    name: str
    func: CommandFunc
    usage: str = ""
    help: str = ""
    aliases: tuple[str, ...] = ()
    # What the first argument completes from: a fixed list, or "sessions" / "branches" /
    # "paths" (the files and folders it names so far).
    completes: tuple[str, ...] | str = ()

    @property
    def signature(self) -> str:
        return f"/{self.name} {self.usage}".rstrip()


@dataclass
class Registry:
    """The commands, by name and alias, in the order they were added (the order of /help)."""

    commands: dict[str, Command] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)

    def add(self, cmd: Command) -> None:
        self.commands[cmd.name] = cmd
        for alias in cmd.aliases:
            self._aliases[alias] = cmd.name

    def find(self, name: str) -> Command | None:
        return self.commands.get(self._aliases.get(name, name))

    def names(self) -> list[str]:
        return sorted([*self.commands, *self._aliases])

    def dispatch(self, ctx: Context, line: str) -> Outcome:
        """Run a `/command args` line. An unknown command or a bad argument raises UsageError
        naming the usage."""
        name, _, arg = line.strip().removeprefix("/").partition(" ")
        cmd = self.find(name)
        if cmd is None:
            raise UsageError(f"unknown command /{name}: /help lists them")
        try:
            return cmd.func(ctx, arg.strip())
        except UsageError as exc:
            raise UsageError(f"{exc} (usage: {cmd.signature})") from None
