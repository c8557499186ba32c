"""The REPL: the prompt-toolkit session (history file, completion, key bindings, toolbar), the
loop, Ctrl-C and Ctrl-D; and the plain line loop used when stdin is not a terminal.

Each line is a message or a slash command; both go through `Repl.handle`, so the two loops behave
alike. A line that fails (an error, a refused command, an interrupted answer) is counted, so that
the line loop and a one-shot prompt can exit 1. Everything else belongs to the rooms this one
calls: `Conversation` (the conversation), the command registry, the `Renderer` (all output).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TextIO

from kvrepl.app.commands import Context, Generate, Prefill, Quit, Registry
from kvrepl.app.render import Renderer
from kvrepl.app.userfiles import compose, names
from kvrepl.chat.conversation import Conversation
from kvrepl.chat.guards import Terminated, raise_if_ended
from kvrepl.chat.turn import Turn
from kvrepl.errors import KvreplError, PromptError

QUIT_WORDS = {"q", "/q", "/quit", "/exit"}
PROMPT = "› "
LOG_NAME = "kvrepl.log"  # in the store: the traceback of each internal error


def log_path(home: Path) -> Path:
    """The log of internal errors in the store `home` (`kvrepl path --log` prints it)."""
    return home / LOG_NAME


class Repl:
    """Dispatches lines; shared by the interactive and the line loop."""

    def __init__(
        self,
        chat: Conversation,
        renderer: Renderer,
        registry: Registry,
        *,
        interactive: bool,
    ) -> None:
        self.chat, self.renderer, self.registry = chat, renderer, registry
        self.ctx = Context(chat, renderer, registry, interactive=interactive)
        self.prefill: Prefill | None = None
        self.failures = 0  # lines that failed: errors, refused commands, interrupted answers

    def handle(self, line: str) -> bool:
        """Run one line; False when the REPL should end. Errors are one line; the REPL goes on."""
        return self._guard(self._handle, line)

    def send(self, text: str) -> None:
        """Answer `text` as a message, even if it starts with a slash (a one-shot prompt)."""
        self._guard(lambda t: self._run(self._message(t, one_shot=True)), text)

    def _guard(self, step: Callable[[str], bool], line: str) -> bool:
        """Run `step`; an error is one line and the REPL goes on. SIGTERM or SIGHUP (Terminated)
        ends it, once the turn it stopped is kept."""
        try:
            keep_going = step(line)
        except Terminated:
            raise
        except KvreplError as exc:
            self._failed(str(exc))
        except KeyboardInterrupt:
            self.renderer.notice("interrupted")
            self.failures += 1
        except Exception as exc:  # a bug: say it in one line, keep the traceback for the log
            raise_if_ended()  # output failing after SIGHUP (the terminal is gone) is no bug
            where = self._log(traceback.format_exc())
            said = f" (the details are in {where})" if where else ""
            self._failed(f"internal error: {type(exc).__name__}: {exc}{said}")
        else:
            raise_if_ended()  # a turn took SIGTERM or SIGHUP as its interrupt: end now
            return keep_going
        return True

    def _failed(self, message: str) -> None:
        self.renderer.error(message)
        self.failures += 1

    def _handle(self, line: str) -> bool:
        stripped = line.strip()
        if not stripped:
            return True
        if stripped in QUIT_WORDS:
            return False
        if stripped.startswith("/"):
            return self._run(self.registry.dispatch(self.ctx, stripped))
        return self._run(self._message(line))

    def _message(self, text: str, *, one_shot: bool = False) -> Generate:
        """`text` as a message, after the files read for it (`/read`, `-f`): they go with it
        and are stored in it; a message refused before it is stored keeps them for the next."""
        started = time.perf_counter()  # Enter: the first turn's ttft counts the model's load
        with self._no_echo():
            waited = self._wait_for_model()
        attached = self.ctx.attached
        try:
            turn = self.chat.send(compose(attached, text), started=started, waited=waited)
        except PromptError as exc:
            if not attached:
                raise
            them = "them" if len(attached) > 1 else "it"
            hint = "" if one_shot else f"; /read --drop forgets {them}"
            raise PromptError(f"{exc} (with {names(attached)}{hint})") from None
        attached.clear()
        return Generate(turn)

    def unsent(self) -> None:
        """At the end: files read for a message that never came are said (in line mode, a
        failure: the exit status is 1)."""
        if not self.ctx.attached:
            return
        line = f"{names(self.ctx.attached)} not sent: no message came after it"
        self.ctx.attached.clear()
        if self.ctx.interactive:
            self.renderer.notice(line)
        else:
            self._failed(line)

    def _run(self, outcome: Any) -> bool:
        if isinstance(outcome, Quit):
            return False
        if isinstance(outcome, Prefill):
            self.prefill = outcome
        elif isinstance(outcome, Generate):
            with self._no_echo():
                self._wait_for_model()
                self.render_turn(outcome.turn)
        return True

    def _no_echo(self) -> AbstractContextManager[None]:
        return _no_echo(sys.stdin if self.ctx.interactive else None)

    def submit_prefilled(self, text: str) -> bool:
        """The user's answer to a prefilled prompt (e.g. `/edit N` without text)."""
        pending, self.prefill = self.prefill, None
        if pending is None or text.lstrip().startswith("/") or text.strip() in QUIT_WORDS:
            return self.handle(text)  # a command typed over the prefilled text cancels the edit
        return self._guard(lambda t: self._run(pending.then(t)), text)

    def render_turn(self, turn: Turn) -> None:
        """Show a turn as it streams. Ctrl-C stops it: the partial answer is kept (marked
        interrupted) and the cache stays consistent; then back to the prompt."""
        session = self.chat.session
        about = {"session_id": session.id, "session_name": session.name} if session else {}
        self.renderer.begin(about)
        result = None
        try:
            result = turn.run(self.renderer.feed)
        finally:  # a refused or failed turn shows no figures: its error line follows
            self.renderer.end(result)
        self.failures += result.interrupted

    def _wait_for_model(self) -> float:
        """Wait for the model, with a status line while it loads; the seconds waited."""
        if self.chat.model.ready():
            self.chat.model.get()
            return 0.0
        t0 = time.perf_counter()
        with self.renderer.status(self.chat.model.status()):
            self.chat.model.get()
        return time.perf_counter() - t0

    def _log(self, text: str) -> Path | None:
        """Append to the log; where it is, or None when it cannot be written."""
        log = log_path(self.chat.home)
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError:
            return None
        return log


@contextmanager
def _no_echo(stream: TextIO | None) -> Iterator[None]:
    """While an answer streams, keys typed ahead are not echoed: the terminal's echo would move
    the cursor under rich's live region and duplicate lines. They stay queued, as typed, for the
    next prompt; Ctrl-C still interrupts."""
    if stream is None or not stream.isatty():
        yield
        return
    import termios

    fd = stream.fileno()
    old = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[0] &= ~termios.ICRNL  # Enter stays Enter (CR), not Ctrl-J, for the next prompt
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def line_loop(repl: Repl, lines: Iterable[str]) -> int:
    """Not a terminal: each line a message or a command. The exit status: 1 when any line
    failed, else 0."""
    for raw in lines:
        if not repl.handle(raw.rstrip("\r\n")):
            break
    repl.unsent()
    return 1 if repl.failures else 0


def stdin_lines(stream: TextIO | None = None) -> Iterator[str]:
    stream = stream or sys.stdin
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")  # invalid UTF-8 becomes U+FFFD, never a crash
    yield from stream


def interactive_loop(repl: Repl, home: Path, *, toolbar: Callable[[], str],
                     on_drawn: Callable[[], None] | None = None,
                     input: Any = None, output: Any = None) -> int:  # fmt: skip
    """The prompt-toolkit loop. `on_drawn` runs each time the screen has been drawn (kvrepl
    starts the model's load there: its imports would slow the first prompt down). `input` and
    `output` let tests drive it through a pipe."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.utils import get_cwidth

    from kvrepl.app.fold import FoldTallLines
    from kvrepl.app.keys import SlashCompleter, make_key_bindings

    try:
        home.mkdir(parents=True, exist_ok=True)
        history: Any = FileHistory(str(home / "history"))
    except OSError:
        history = InMemoryHistory()
    session: PromptSession[str] = PromptSession(
        history=history,
        auto_suggest=AutoSuggestFromHistory(),
        completer=SlashCompleter(repl.registry, repl.chat),
        complete_while_typing=True,
        key_bindings=make_key_bindings(),
        input_processors=[FoldTallLines(get_cwidth(PROMPT))],  # a paste of any size stays shown
        bottom_toolbar=toolbar,
        refresh_interval=0.5,
        input=input,
        output=output,
    )
    if on_drawn is not None:
        session.app.after_render += lambda _app: on_drawn()
    while True:
        default = repl.prefill.text if repl.prefill else ""
        try:
            line = session.prompt(PROMPT, default=default)
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            repl.prefill = None
            continue
        except EOFError:  # Ctrl-D
            break
        keep_going = repl.submit_prefilled(line) if repl.prefill else repl.handle(line)
        if not keep_going:
            break
    repl.unsent()
    return 0
