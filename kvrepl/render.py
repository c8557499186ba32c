"""All terminal output of kvrepl: the one rich Console and everything printed through it.

Owns streaming answer text (live, then Markdown), the thinking panel, notices, the per-turn stats
line, errors, tables and spinners, and plain mode (no ANSI, no Live) when output is not a terminal.
It never generates text and never touches the model, the cache or the database: it only consumes
the events of `kvrepl.events`.

Long answers are streamed without rich's Live duplicating lines once the text is taller than the
terminal (rich issue #3263): finished Markdown blocks are printed once, above the live region, and
only the unfinished tail stays live, cropped to the terminal height.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import IO

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from kvrepl.events import Finish, Notice, Stats, TextDelta, ThinkDelta, TurnEvent

# The same parser configuration rich's Markdown uses, so our block boundaries match its rendering.
_PARSER = MarkdownIt().enable("strikethrough").enable("table")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_TABLE_RULE = re.compile(r"\s*\|?\s*:?-+:?\s*\|[\s|:-]*$")


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


def split_finished(text: str) -> tuple[str, str]:
    """Split streamed Markdown into (finished blocks, unfinished tail).

    Only complete lines are parsed, and every top-level block but the last is finished: a later
    line can still extend the last one (a paragraph, a list, an unclosed ``` fence)."""
    complete = text[: text.rfind("\n") + 1]
    starts = _block_starts(complete)
    if len(starts) < 2:
        return "", text
    finished = "".join(complete.splitlines(keepends=True)[: starts[-1]])
    return finished, text[len(finished) :]


def _block_starts(markdown: str) -> list[int]:
    """The first line of each top-level block (closing tokens carry no line map)."""
    return [t.map[0] for t in _PARSER.parse(markdown) if t.level == 0 and t.map is not None]


@dataclass(frozen=True)
class TurnResult:
    """What the renderer saw of one turn."""

    text: str
    think: str
    stats: Stats | None
    finish_reason: str | None
    interrupted: bool


@dataclass(frozen=True)
class SessionRow:
    """One line of a session listing; `snapshot_bytes` is None when there is no snapshot."""

    name: str
    title: str
    turns: int
    tokens: int
    updated: datetime | str | float  # a float is a Unix time
    snapshot_bytes: int | None = None


def format_size(n_bytes: int | None) -> str:
    """`5.0 MiB`; `-` for no snapshot."""
    if n_bytes is None:
        return "-"
    if n_bytes < 1024:
        return f"{n_bytes} B"
    size = n_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _format_time(value: datetime | str | float) -> str:
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value)
    return value.strftime("%Y-%m-%d %H:%M") if isinstance(value, datetime) else value


def _last_block_stub(markdown: str) -> str:
    """A short block of the same kind as the last block of `markdown`: the spacing after a block
    depends on its kind only, and a long code block should not be rendered again to learn it."""
    starts = _block_starts(markdown)
    lines = markdown.rstrip().splitlines(keepends=True)[starts[-1] :] if starts else []
    return "".join(lines[:2] + lines[-1:] if len(lines) > 3 else lines) + "\n\n"


def _tail_source(text: str, max_lines: int) -> str:
    """The end of an unfinished block, enough to fill the screen: redrawing a growing code block
    whole would cost more on every refresh. A fence keeps its opening line, a table its header."""
    lines = text.lstrip("\n").splitlines(keepends=True)
    if len(lines) <= max_lines + 2:
        return text
    head = lines[:1] if _FENCE.match(lines[0]) else []
    head = lines[:2] if _TABLE_RULE.match(lines[1]) else head
    return "".join(head + lines[-max_lines:])


class _Continuation:
    """Markdown `text` as it looks after `before` in one document: rich's spacing between blocks
    depends on both (a list brings its own blank line), so render both and drop `before`'s lines.
    The live tail, redrawn often, takes the cheap way: one blank line in between."""

    def __init__(self, before: str, text: str, *, exact: bool = True) -> None:
        self.before, self.text, self.exact = before, text, exact

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        options = options.update(height=None)
        if not self.before:
            lines = console.render_lines(Markdown(self.text), options, pad=False)
        elif self.exact:
            skip = len(console.render_lines(Markdown(self.before), options, pad=False))
            combined = Markdown(self.before + self.text)
            lines = console.render_lines(combined, options, pad=False)[skip:]
        else:
            lines = console.render_lines(Markdown(self.text), options, pad=False)
            while lines and not any(segment.text for segment in lines[0]):
                lines.pop(0)
            lines.insert(0, [])
        for line in lines:
            yield from line
            yield Segment.line()


class _LiveTail:
    """The live region: whatever the renderer shows now, cut to its last lines so that it is
    never taller than the terminal (a taller Live cannot move the cursor back up: #3263)."""

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        view = self._renderer._live_view()
        lines = console.render_lines(view, options.update(height=None), pad=False)
        keep = max(1, options.size.height - 1)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()


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
        self.console.print(_Continuation(self._context, chunk))
        self._context = _last_block_stub(chunk)

    def _live_view(self) -> RenderableType:
        if self._phase == "think":
            think = "".join(self._think_segment)
            if not self.show_think:
                return Text(f"thinking… ({len(think):,} chars)", style="dim italic")
            return Group(Text("thinking…", style="dim italic"), Text(think.strip(), style="dim"))
        if not self._pending.strip():
            return Text("")
        tail = _tail_source(self._pending, self.console.height)
        return _Continuation(self._context, tail, exact=False)

    def _refresh(self, force: bool = False) -> None:
        if self._live is None:
            self._live = Live(
                _LiveTail(self),
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
             f"{s.tokens:,}" if tty else s.tokens, _format_time(s.updated),
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
