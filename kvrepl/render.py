"""All terminal output of kvrepl: the one rich Console and everything printed through it.

Owns streaming answer text (live, then Markdown), the thinking panel, notices, the per-turn stats
line, the progress line of a long prefill, errors, tables and spinners, and plain mode (no ANSI,
no Live) when output is not a terminal. Which stream gets what is decided here: answers (and a
command's output) on `console`; notices, stats and errors on `err` (stderr when output is piped,
the same console in a terminal); with `json_lines`, one JSON object per answer and nothing else on
`console`. It never generates text and never touches the model, the cache or the database: it
only consumes the events of `kvrepl.events`. How streamed Markdown is cut into finished blocks
and a live tail (without rich's Live duplicating lines, rich issue #3263) is mdstream.py's; the
text of the stats, progress and JSON lines is turnlines.py's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kvrepl.events import Finish, Notice, Progress, Stats, TextDelta, ThinkDelta, TurnEvent
from kvrepl.listing import SESSION_COLUMNS, SessionRow, session_cells
from kvrepl.listing import format_size as format_size  # callers take it from here
from kvrepl.mdstream import Continuation, LiveTail, last_block_stub, split_finished, tail_source
from kvrepl.turnlines import PROGRESS_AFTER_S, TurnResult, format_progress, turn_object
from kvrepl.turnlines import format_stats as format_stats  # callers take it from here


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


class Renderer:
    """Prints turns and messages through one Console.

    Drive a turn with `begin()`, `feed(event)` for each event, and `end()`; `end` is safe at any
    point (e.g. after Ctrl-C: `end(interrupted=True)`). `turn(events)` does all three.
    """

    def __init__(
        self,
        console: Console,
        *,
        err: Console | None = None,
        json_lines: bool = False,
        show_think: bool = False,
        plain: bool | None = None,
        refresh_interval: float = 0.05,
    ) -> None:
        self.console = console
        self.err = err or console
        self.json_lines = json_lines
        # A command's output (/history, tables) is what it answers: stdout, unless that is JSON.
        self.data = self.err if json_lines else console
        self.show_think = show_think
        self.plain = json_lines or ((not console.is_interactive) if plain is None else plain)
        self.refresh_interval = refresh_interval
        self._line_start: dict[int, bool] = {}  # per output file, in plain mode
        self._answers = 0  # answers written so far, to keep a blank line between them
        self._reset()
        self._active = False

    def _reset(self) -> None:
        self._live: Live | None = None
        self._last_refresh = 0.0
        self._phase: str | None = None  # None, "think" or "text"
        self._think_parts: list[str] = []
        self._think_segment: list[str] = []
        self._text_parts: list[str] = []
        self._pending = ""  # answer text not yet printed as Markdown
        self._unprinted = ""  # a finished chunk whose print may have been cut short
        self._context = ""  # the last Markdown block printed, for the spacing after it
        self._stats: Stats | None = None
        self._reason: str | None = None
        self._interrupted = False
        self._progress: Progress | None = None
        self._wrote_answer = False
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
            self._on_progress(event)
        elif isinstance(event, Finish):
            self._reason = event.reason
            self._interrupted |= event.reason == "interrupted"
        elif isinstance(event, Stats):
            self._stats = event

    def end(self, *, interrupted: bool = False, stats: Stats | None = None) -> TurnResult:
        """Finish the display: the rest of the answer, then exactly one stats line."""
        self._interrupted |= interrupted
        if stats is not None:
            self._stats = stats
        if self._active:
            self._active = False
            try:
                self._close_think()
            finally:
                self._stop_live()
            if self.plain:
                self._line_break()
            else:
                self._print_chunk(self._unprinted + self._pending)
                self._unprinted = self._pending = ""
            self._answers += self._wrote_answer
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

    def turn(self, events: Iterable[TurnEvent]) -> TurnResult:
        """Render a whole turn. Ctrl-C (KeyboardInterrupt) ends it cleanly as interrupted; any
        other exception ends the display and propagates."""
        self.begin()
        try:
            for event in events:
                self.feed(event)
        except KeyboardInterrupt:
            _close(events)
            return self.end(interrupted=True)
        except BaseException:
            _close(events)
            self.end(interrupted=True)
            raise
        return self.end()

    # ---- streaming internals ---------------------------------------------------------------

    def _on_think(self, text: str) -> None:
        if self._phase == "text":
            self._flush(final=True)
            self._context = ""  # the forced chunk may end inside a code fence
        if self._phase != "think":
            self._phase = "think"
            self._think_segment = []
            if self._raw_think():
                self._line_break()
                self._write_answer("<think>\n")
        self._think_parts.append(text)
        self._think_segment.append(text)
        if self.plain:
            if self._raw_think():
                self._write_answer(text)
        else:
            self._refresh()

    def _raw_think(self) -> bool:
        """Thinking written out as text, between <think> tags: plain mode with --think."""
        return self.plain and self.show_think and not self.json_lines

    def _close_think(self) -> None:
        """Leave the thinking phase: the thinking panel, or a hint that there was thinking."""
        if self._phase != "think":
            return
        self._phase = None
        think = "".join(self._think_segment).strip()
        if self._raw_think():
            self._line_break()
            self._write_answer("</think>\n")
        elif self.json_lines:
            return  # the object holds the thinking (with --think) or nothing
        elif think and self.show_think:
            panel = Panel(Text(think, style="dim"), title="thinking", title_align="left")
            self.console.print(panel, style="dim")
        elif think:
            self.notice(f"(thought for {len(think):,} chars — /think to show)")

    def _on_text(self, text: str) -> None:
        if self._phase != "text":
            self._close_think()
            self._phase = "text"
        self._text_parts.append(text)
        if self.json_lines:
            return
        if self.plain:
            self._write_answer(text)
            return
        self._pending += text
        if "\n" in text:
            self._flush()
        self._refresh()

    def _flush(self, final: bool = False) -> None:
        """Print the finished Markdown blocks of the pending text once, above the live tail."""
        finished, rest = (self._pending, "") if final else split_finished(self._pending)
        if not finished:
            return
        self._unprinted, self._pending = finished, rest
        self._print_chunk(finished)
        self._unprinted = ""
        self._refresh(force=True)

    def _print_chunk(self, chunk: str) -> None:
        if not chunk.strip():
            return
        self.console.print(Continuation(self._context, chunk))
        self._context = last_block_stub(chunk)

    def _on_progress(self, p: Progress) -> None:
        """A transient line under a long prefill, in a terminal only; the first piece of the
        answer (or of its thinking) takes its place."""
        if self.plain or self._phase is not None or p.elapsed_s < PROGRESS_AFTER_S:
            return
        self._progress = p
        if self._live is None:
            self._refresh()  # starts the live region without drawing it
        self._refresh(force=True)

    def _live_view(self) -> RenderableType:
        if self._phase is None and self._progress is not None:
            return Text(format_progress(self._progress), style="dim")
        if self._phase == "think":
            think = "".join(self._think_segment)
            if not self.show_think:
                return Text(f"thinking… ({len(think):,} chars)", style="dim italic")
            return Group(Text("thinking…", style="dim italic"), Text(think.strip(), style="dim"))
        if not self._pending.strip():
            return Text("")
        tail = tail_source(self._pending, self.console.height)
        return Continuation(self._context, tail, exact=False)

    def _refresh(self, force: bool = False) -> None:
        if self._live is None:
            self._live = Live(
                LiveTail(self._live_view),
                console=self.console,
                auto_refresh=False,
                transient=True,
                vertical_overflow="crop",
            )
            self._live.start()
            self._last_refresh = time.monotonic()
            return
        now = time.monotonic()
        if force or now - self._last_refresh >= self.refresh_interval:
            self._live.refresh()
            self._last_refresh = now

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def _write(self, text: str, target: Console | None = None) -> None:
        """Plain mode: raw text straight to the file, flushed so it streams."""
        if not text:
            return
        file = (target or self.console).file
        file.write(text)
        file.flush()
        self._line_start[id(file)] = text.endswith("\n")

    def _write_answer(self, text: str) -> None:
        """Plain mode: answer text; a blank line first between answers when nothing else (the
        stats line went to stderr) keeps them apart."""
        if not self._wrote_answer and self._answers and self.err is not self.console:
            self._write("\n")
        self._wrote_answer = True
        self._write(text)

    def _line_break(self, target: Console | None = None) -> None:
        file = (target or self.console).file
        if self.plain and not self._line_start.get(id(file), True):
            self._write("\n", target)

    # ---- single messages -------------------------------------------------------------------

    def _line(self, text: str, style: str = "", target: Console | None = None) -> None:
        """One message line: styled and wrapped by rich, or raw and unwrapped in plain mode."""
        if self.plain:
            self._line_break(target)
            self._write(text + "\n", target)
        else:
            (target or self.console).print(Text(text, style=style))

    def notice(self, msg: str) -> None:
        """One dim, italic informative line (cache cuts, dropped snapshots)."""
        self._line(msg, "dim italic", self.err)

    def info(self, msg: str) -> None:
        """A line of a command's output (/history, an export)."""
        self._line(msg, "", self.data)

    def confirm(self, msg: str) -> None:
        """A line saying what a command did (`saved as 'demo'`): a notice when output is piped."""
        self._line(msg, "", self.err)

    def warning(self, msg: str) -> None:
        self._line(f"warning: {msg}", "yellow", self.err)

    def error(self, msg: str) -> None:
        self._line(f"error: {msg}", "bold red", self.err)

    def print_markdown(self, text: str) -> None:
        """A whole message, e.g. from history: Markdown in a terminal, raw text in plain mode."""
        if self.plain:
            self._line_break(self.data)
            self._write(text if text.endswith("\n") else text + "\n", self.data)
        else:
            self.data.print(Markdown(text))

    def print_table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[object]],
        *,
        title: str | None = None,
        right_align: Sequence[str] = (),
    ) -> None:
        """A rich Table in a terminal; tab-separated lines without a header in plain mode."""
        cells = [["" if value is None else str(value) for value in row] for row in rows]
        if self.plain:
            self._write("".join("\t".join(row) + "\n" for row in cells), self.data)
            return
        table = Table(title=title, header_style="bold", box=None, pad_edge=False)
        for name in columns:
            table.add_column(name, justify="right" if name in right_align else "left")
        for row in cells:
            table.add_row(*row)
        self.data.print(table)

    def print_sessions(self, sessions: Iterable[SessionRow], *, current: str | None = None) -> None:
        """The session listing; the current session is marked with `*` in a terminal."""
        rows = session_cells(sessions, current, tty=not self.plain)
        self.print_table(SESSION_COLUMNS, rows, right_align=("turns", "tokens", "snapshot"))

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A spinner with `text` while the block runs; nothing in plain mode."""
        if self.plain:
            yield
            return
        with self.err.status(Text(text, style="dim")):
            yield


def _close(events: Iterable[TurnEvent]) -> None:
    """Close a generator left suspended by an exception, so its cleanup runs now."""
    close = getattr(events, "close", None)
    if callable(close):
        close()
