"""All output of kvrepl: the one rich Console, and the renderers that print through it.

`Renderer` is the interface every caller uses and the logic a turn has whatever the output:
begin/feed/end, the thinking shown or hinted at, the stats line or, under `--json`, one JSON
object per answer (and nothing else on `console`); notices, a command's output and errors;
tables, Markdown, the session listing and spinners. Which stream gets what is decided here:
answers (and a command's output) on `console`; notices, stats and errors on `err` (stderr when
output is piped, the same console in a terminal). How each thing looks is a renderer's own:
render_term.py's in a terminal (Live text, then Markdown; a thinking panel; the progress line of
a long prefill), render_plain.py's otherwise (raw text, streamed, no ANSI). `make_renderer`
(and `Renderer(...)`, which is the same call) picks one.

It never generates text and never touches the model, the cache or the database: it only
consumes the events of `kvrepl.events`. The text of the stats, progress and JSON lines is
turnlines.py's; the session listing's cells are listing.py's.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import IO, Any

from rich.console import Console

from kvrepl.app.listing import SESSION_COLUMNS, SessionRow, pool_line, session_cells
from kvrepl.app.turnlines import TurnResult, format_stats, turn_object
from kvrepl.chat.turn import Result
from kvrepl.events import Notice, Progress, Stats, TextDelta, ThinkDelta, TurnEvent

__all__ = ["Renderer", "make_console"]


def make_console(
    file: IO[str] | None = None, *, plain: bool | None = None, width: int | None = None
) -> Console:
    """The one Console of the program. Plain (no ANSI, no colour, no Live) when `plain` is true,
    or when it is None and the output is not a terminal; `plain=False` forces terminal output.
    NO_COLOR turns colour off (styles such as bold stay)."""
    if plain:
        # Not a terminal as far as rich knows: no colour codes, no cursor moves, hence no Live.
        return Console(file=file, width=width, force_terminal=False, force_interactive=False,
                       color_system=None, no_color=True, highlight=False, emoji=False)  # fmt: skip
    no_color = bool(os.environ.get("NO_COLOR")) or None
    force = True if plain is False else None
    return Console(file=file, width=width, force_terminal=force, no_color=no_color, highlight=False)


class Renderer(ABC):
    """Prints turns and messages through one Console (renderers.make_renderer makes the one that
    fits: PlainRenderer or TermRenderer).

    Drive a turn with `begin()`, `feed(event)` for each event, and `end()`; `end` is safe at any
    point (e.g. after Ctrl-C: `end(interrupted=True)`). The methods marked abstract are how a
    renderer shows things; everything else is the same for both.
    """

    plain: bool  # raw text, no ANSI (the class says which)

    def __init__(
        self,
        console: Console,
        *,
        err: Console | None = None,
        json_lines: bool = False,
        show_think: bool = False,
        plain: bool | None = None,  # chose the class (see renderer_class)
        refresh_interval: float = 0.05,  # at most this often a live region redraws
    ) -> None:
        self.console = console
        self.err = err or console
        self.json_lines = json_lines
        # A command's output (/history, tables) is what it answers: stdout, unless that is JSON.
        self.data = self.err if json_lines else console
        self.show_think = show_think
        self.refresh_interval = refresh_interval
        self._line_start: dict[int, bool] = {}  # per output file, for raw text
        self._reset()
        self._active = False

    def _reset(self) -> None:
        """A new turn's state (a renderer adds its own)."""
        self._phase: str | None = None  # None, "think" or "text"
        self._think_parts: list[str] = []
        self._think_segment: list[str] = []
        self._text_parts: list[str] = []
        self._stats: Stats | None = None
        self._reason: str | None = None
        self._interrupted = False
        self._about: dict[str, Any] = {}

    # ---- a turn --------------------------------------------------------------------------

    def begin(self, about: dict[str, Any] | None = None) -> None:
        """Start a turn (ends one left open); `about` goes into its JSON object (the session)."""
        if self._active:
            self.end()
        self._reset()
        self._about = dict(about or {})
        self._active = True

    def feed(self, event: TurnEvent) -> None:
        """Show one event of the turn."""
        if not self._active:
            self.begin()
        if isinstance(event, TextDelta):
            self._on_text(event.text)
        elif isinstance(event, ThinkDelta):
            self._on_think(event.text)
        elif isinstance(event, Notice):
            self.notice(event.text)
        elif isinstance(event, Progress):
            self._show_progress(event)

    def end(self, result: Result | None = None) -> TurnResult:
        """Finish the display: the rest of the answer, then exactly one stats line, from the
        turn's `result` (its figures, why it ended, whether it was interrupted): the one door
        by which the figures reach the screen. None: a turn that failed, or was only shown."""
        if result is not None:
            self._stats, self._reason = result.stats, result.finish_reason
            self._interrupted |= result.interrupted
        if self._active:
            self._active = False
            try:
                self._close_think()
            finally:
                self._stop_live()
            self._end_answer()
            self._figures()
        return self._result()

    def _result(self) -> TurnResult:
        text, think = "".join(self._text_parts), "".join(self._think_parts)
        return TurnResult(text, think, self._stats, self._reason, self._interrupted)

    def _figures(self) -> None:
        """The turn's stats line, or under --json its object (a turn that failed has neither:
        its error line says what happened)."""
        if self.json_lines:
            if self._stats is not None or self._interrupted:
                obj = turn_object(self._result(), self._about, think=self.show_think)
                self._write(json.dumps(obj, ensure_ascii=False) + "\n")
            return
        line = format_stats(self._stats, self._interrupted, hit_max_tokens=self._reason == "length")
        if line:
            self._line(line, "dim", self.err)

    def _on_think(self, text: str) -> None:
        if self._phase != "think":
            if not self.json_lines:
                self._open_think()
            self._phase = "think"
            self._think_segment = []
        self._think_parts.append(text)
        self._think_segment.append(text)
        if not self.json_lines:  # the object holds the thinking (with --think) or nothing
            self._show_think(text)

    def _close_think(self) -> None:
        """Leave the thinking phase: the thinking shown, or a hint that there was thinking."""
        if self._phase != "think":
            return
        self._phase = None
        think = "".join(self._think_segment).strip()
        if self.json_lines:
            return
        if self.show_think:
            self._end_think(think)
        elif think:
            self.notice(f"(thought for {len(think):,} chars — /think to show)")

    def _on_text(self, text: str) -> None:
        if self._phase != "text":
            self._close_think()
            self._phase = "text"
        self._text_parts.append(text)
        if not self.json_lines:  # the object holds the answer
            self._show_text(text)

    def _write(self, text: str, target: Console | None = None) -> None:
        """Raw text straight to the file, flushed so it streams (JSON lines, plain output)."""
        if not text:
            return
        file = (target or self.console).file
        file.write(text)
        file.flush()
        self._line_start[id(file)] = text.endswith("\n")

    # ---- how a renderer shows a turn -----------------------------------------------------

    @abstractmethod
    def _open_think(self) -> None:
        """Thinking starts (after nothing, or after some answer text)."""

    @abstractmethod
    def _show_think(self, text: str) -> None:
        """A piece of thinking."""

    @abstractmethod
    def _end_think(self, think: str) -> None:
        """Thinking ends and is shown (`show_think`): `think` is all of it, stripped."""

    @abstractmethod
    def _show_text(self, text: str) -> None:
        """A piece of the answer."""

    @abstractmethod
    def _show_progress(self, p: Progress) -> None:
        """A prefill's progress, before anything of the answer."""

    @abstractmethod
    def _stop_live(self) -> None:
        """Let go of a live region, also when ending the turn's display failed."""

    @abstractmethod
    def _end_answer(self) -> None:
        """The rest of the answer, before its stats line."""

    # ---- single messages -------------------------------------------------------------------

    @abstractmethod
    def _line(self, text: str, style: str = "", target: Console | None = None) -> None:
        """One message line on `target` (default `console`), in `style` where there are any."""

    def notice(self, msg: str) -> None:
        """One dim, italic informative line (cache cuts, dropped snapshots)."""
        self._line(msg, "dim italic", self.err)

    def info(self, msg: str) -> None:
        """A line of a command's output (/history, an export)."""
        self._line(msg, "", self.data)

    def confirm(self, msg: str) -> None:
        """A line saying what a command did (`saved as 'demo'`): a notice when output is piped."""
        self._line(msg, "", self.err)

    def error(self, msg: str) -> None:
        self._line(f"error: {msg}", "bold red", self.err)

    @abstractmethod
    def print_markdown(self, text: str) -> None:
        """A whole message, e.g. from history or an export."""

    def print_table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[object]],
        *,
        title: str | None = None,
        right_align: Sequence[str] = (),
    ) -> None:
        """A table of a command's output; None cells are empty."""
        cells = [["" if value is None else str(value) for value in row] for row in rows]
        self._table(columns, cells, title, right_align)

    @abstractmethod
    def _table(
        self,
        columns: Sequence[str],
        cells: list[list[str]],
        title: str | None,
        right_align: Sequence[str],
    ) -> None:
        """Lay out a table's cells."""

    def print_sessions(self, sessions: Iterable[SessionRow], *, current: str | None = None,
                       pool_bytes: int | None = None) -> None:  # fmt: skip
        """The session listing; the current session is marked with `*` in a terminal.
        `pool_bytes`: the pool's size, said under the rows when several sessions have chunks on
        disk (a notice: piped, the rows alone are on stdout)."""
        rows = list(sessions)
        cells = session_cells(rows, current, tty=not self.plain)
        self.print_table(SESSION_COLUMNS, cells, right_align=SESSION_COLUMNS[2:6])
        if pool_bytes is not None and sum(bool(r.bytes_on_disk) for r in rows) > 1:
            self.notice(pool_line(pool_bytes))

    @abstractmethod
    def status(self, text: str) -> AbstractContextManager[None]:
        """While the block runs, a spinner with `text` where there is one."""
