"""All terminal output of kvrepl: the one rich Console and everything printed through it.

Owns streaming answer text (live, then Markdown), the thinking panel, notices, the per-turn stats
line, errors, tables and spinners, and plain mode (no ANSI, no Live) when output is not a terminal.
It never generates text and never touches the model, the cache or the database: it only consumes
the events of `kvrepl.events`. How streamed Markdown is cut into finished blocks and a live tail
(without rich's Live duplicating lines, rich issue #3263) is mdstream.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kvrepl.events import Finish, Notice, Stats, TextDelta, ThinkDelta, TurnEvent
from kvrepl.listing import SessionRow, format_size, format_time
from kvrepl.mdstream import Continuation, LiveTail, last_block_stub, split_finished, tail_source


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


def format_stats(
    stats: Stats | None, interrupted: bool = False, *, hit_max_tokens: bool = False
) -> str:
    """One line of turn figures, e.g. `reused 1,204 · prefilled 57 · generated 88 · ttft 0.21 s ·
    31.4 tok/s`, plus `max tokens` and/or `interrupted` when they apply."""
    parts: list[str] = []
    if stats is not None:
        parts += [
            f"reused {stats.reused_tokens:,}",
            f"prefilled {stats.prefilled_tokens:,}",
            f"generated {stats.generated_tokens:,}",
            f"ttft {stats.ttft_s:.2f} s",
            f"{stats.decode_tok_s:.1f} tok/s",
        ]
    if hit_max_tokens:
        parts.append("max tokens")
    if interrupted:
        parts.append("interrupted")
    return " · ".join(parts)


@dataclass(frozen=True)
class TurnResult:
    """What the renderer saw of one turn."""

    text: str
    think: str
    stats: Stats | None
    finish_reason: str | None
    interrupted: bool


class Renderer:
    """Prints turns and messages through one Console.

    Drive a turn with `begin()`, `feed(event)` for each event, and `end()`; `end` is safe at any
    point (e.g. after Ctrl-C: `end(interrupted=True)`). `turn(events)` does all three.
    """

    def __init__(
        self,
        console: Console,
        *,
        show_think: bool = False,
        plain: bool | None = None,
        refresh_interval: float = 0.05,
    ) -> None:
        self.console = console
        self.show_think = show_think
        self.plain = (not console.is_interactive) if plain is None else plain
        self.refresh_interval = refresh_interval
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
        self._at_line_start = True
        self._stats: Stats | None = None
        self._reason: str | None = None
        self._interrupted = False

    # ---- a turn --------------------------------------------------------------------------

    def begin(self) -> None:
        """Start a turn (ends one left open)."""
        if self._active:
            self.end()
        self._reset()
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
            line = format_stats(
                self._stats, self._interrupted, hit_max_tokens=self._reason == "length"
            )
            if line:
                self._line(line, "dim")
        return TurnResult(
            text="".join(self._text_parts),
            think="".join(self._think_parts),
            stats=self._stats,
            finish_reason=self._reason,
            interrupted=self._interrupted,
        )

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
            if self.plain and self.show_think:
                self._line_break()
                self._write("<think>\n")
        self._think_parts.append(text)
        self._think_segment.append(text)
        if self.plain:
            if self.show_think:
                self._write(text)
        else:
            self._refresh()

    def _close_think(self) -> None:
        """Leave the thinking phase: the thinking panel, or a hint that there was thinking."""
        if self._phase != "think":
            return
        self._phase = None
        think = "".join(self._think_segment).strip()
        if self.plain and self.show_think:
            self._line_break()
            self._write("</think>\n")
        elif think and self.show_think:
            panel = Panel(Text(think, style="dim"), title="thinking", title_align="left")
            self.console.print(panel, style="dim")
        elif think:
            self._line(f"(thought for {len(think):,} chars — /think to show)", "dim italic")

    def _on_text(self, text: str) -> None:
        if self._phase != "text":
            self._close_think()
            self._phase = "text"
        self._text_parts.append(text)
        if self.plain:
            self._write(text)
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

    def _live_view(self) -> RenderableType:
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

    def _write(self, text: str) -> None:
        """Plain mode: raw text straight to the file, flushed so it streams."""
        if not text:
            return
        self.console.file.write(text)
        self.console.file.flush()
        self._at_line_start = text.endswith("\n")

    def _line_break(self) -> None:
        if self.plain and not self._at_line_start:
            self._write("\n")

    # ---- single messages -------------------------------------------------------------------

    def _line(self, text: str, style: str = "") -> None:
        """One message line: styled and wrapped by rich, or raw and unwrapped in plain mode."""
        if self.plain:
            self._line_break()
            self._write(text + "\n")
        else:
            self.console.print(Text(text, style=style))

    def notice(self, msg: str) -> None:
        """One dim, italic informative line (cache cuts, dropped snapshots)."""
        self._line(msg, "dim italic")

    def info(self, msg: str) -> None:
        self._line(msg)

    def warning(self, msg: str) -> None:
        self._line(f"warning: {msg}", "yellow")

    def error(self, msg: str) -> None:
        self._line(f"error: {msg}", "bold red")

    def print_markdown(self, text: str) -> None:
        """A whole message, e.g. from history: Markdown in a terminal, raw text in plain mode."""
        if self.plain:
            self._line_break()
            self._write(text if text.endswith("\n") else text + "\n")
        else:
            self.console.print(Markdown(text))

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
            self._write("".join("\t".join(row) + "\n" for row in cells))
            return
        table = Table(title=title, header_style="bold", box=None, pad_edge=False)
        for name in columns:
            table.add_column(name, justify="right" if name in right_align else "left")
        for row in cells:
            table.add_row(*row)
        self.console.print(table)

    def print_sessions(self, sessions: Iterable[SessionRow], *, current: str | None = None) -> None:
        """The session listing; the current session is marked with `*` in a terminal."""
        tty = not self.plain
        rows = [
            (f"* {s.name}" if tty and s.name == current else s.name, s.title, s.turns,
             f"{s.tokens:,}" if tty else s.tokens,
             # plain mode keeps the store's ISO text as is: scripts read it
             s.updated if not tty and isinstance(s.updated, str) else format_time(s.updated),
             format_size(s.snapshot_bytes))
            for s in sessions
        ]  # fmt: skip
        columns = ("name", "title", "turns", "tokens", "updated", "snapshot")
        self.print_table(columns, rows, right_align=("turns", "tokens", "snapshot"))

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A spinner with `text` while the block runs; nothing in plain mode."""
        if self.plain:
            yield
            return
        with self.console.status(Text(text, style="dim")):
            yield


def _close(events: Iterable[TurnEvent]) -> None:
    """Close a generator left suspended by an exception, so its cleanup runs now."""
    close = getattr(events, "close", None)
    if callable(close):
        close()
