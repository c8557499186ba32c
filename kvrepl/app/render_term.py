"""The terminal renderer: how a turn and a message look on a screen.

The answer streams live, then stays as Markdown: finished blocks are printed once above a live
region that holds only the unfinished tail, cropped to the terminal's height (rich's Live
duplicates lines once it is taller than the terminal, rich issue #3263; the cutting is
mdstream.py's). Thinking is a live "thinking…" line, then a panel (or a hint); a long prefill
shows a transient progress line until the first piece of the answer takes its place. Messages
are styled rich Text, tables rich Tables, spinners rich's status. The turn logic, and which
stream gets what, are render.py's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kvrepl.app.mdstream import (
    Continuation,
    LiveTail,
    last_block_stub,
    markdown,
    split_finished,
    tail_source,
)
from kvrepl.app.render import Renderer
from kvrepl.app.turnlines import PROGRESS_AFTER_S, format_progress
from kvrepl.events import Progress


class TermRenderer(Renderer):
    """Rich output for a terminal: Live text, Markdown, panels, spinners, the progress line."""

    plain = False

    def _reset(self) -> None:
        super()._reset()
        self._live: Live | None = None
        self._last_refresh = 0.0
        self._pending = ""  # answer text not yet printed as Markdown
        self._unprinted = ""  # a finished chunk whose print may have been cut short
        self._context = ""  # the last Markdown block printed, for the spacing after it
        self._progress: Progress | None = None

    # ---- a turn --------------------------------------------------------------------------

    def _open_think(self) -> None:
        if self._phase == "text":
            self._flush(final=True)
            self._context = ""  # the forced chunk may end inside a code fence

    def _show_think(self, text: str) -> None:
        self._refresh()

    def _end_think(self, think: str) -> None:
        if think:
            panel = Panel(Text(think, style="dim"), title="thinking", title_align="left")
            self.console.print(panel, style="dim")

    def _show_text(self, text: str) -> None:
        self._pending += text
        if "\n" in text:
            self._flush()
        self._refresh()

    def _show_progress(self, p: Progress) -> None:
        """A transient line under a long prefill; the first piece of the answer (or of its
        thinking) takes its place."""
        if self._phase is not None or p.elapsed_s < PROGRESS_AFTER_S:
            return
        self._progress = p
        if self._live is None:
            self._refresh()  # starts the live region without drawing it
        self._refresh(force=True)

    def _end_answer(self) -> None:
        self._print_chunk(self._unprinted + self._pending)
        self._unprinted = self._pending = ""

    # ---- Markdown above, the live tail below -------------------------------------------------

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

    # ---- single messages -------------------------------------------------------------------

    def _line(self, text: str, style: str = "", target: Console | None = None) -> None:
        """Styled and wrapped by rich; markup in `text` is not interpreted."""
        (target or self.console).print(Text(text, style=style))

    def print_markdown(self, text: str) -> None:
        self.data.print(markdown(text))

    def _table(
        self,
        columns: Sequence[str],
        cells: list[list[str]],
        title: str | None,
        right_align: Sequence[str],
    ) -> None:
        table = Table(title=title, header_style="bold", box=None, pad_edge=False)
        for name in columns:
            table.add_column(name, justify="right" if name in right_align else "left")
        for row in cells:
            table.add_row(*row)
        self.data.print(table)

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        with self.err.status(Text(text, style="dim")):
            yield
