"""The plain renderer: output that is not a terminal (a pipe, a file, `--plain`, `--json`).

Raw text, streamed as it comes and flushed, with no ANSI codes, no Live, no wrapping and no
spinners: an answer is its deltas as they arrive (with `--think`, its thinking between
`<think>` tags first), a message one unwrapped line, a table tab-separated lines without a
header, Markdown its source. A message starts on a line of its own, also after answer text left
mid-line on the same stream. The turn logic, which stream gets what and the JSON lines are
render.py's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from kvrepl.app.render import Renderer
from kvrepl.events import Progress


class PlainRenderer(Renderer):
    """Raw text for scripts and pipes."""

    plain = True

    def __init__(self, console: Console, **kwargs: Any) -> None:
        super().__init__(console, **kwargs)
        self._answers = 0  # answers written so far, to keep a blank line between them

    def _reset(self) -> None:
        super()._reset()
        self._wrote_answer = False

    # ---- a turn --------------------------------------------------------------------------

    def _open_think(self) -> None:
        if self.show_think:
            self._line_break()
            self._write_answer("<think>\n")

    def _show_think(self, text: str) -> None:
        if self.show_think:
            self._write_answer(text)

    def _end_think(self, think: str) -> None:
        self._line_break()
        self._write_answer("</think>\n")

    def _show_text(self, text: str) -> None:
        self._write_answer(text)

    def _show_progress(self, p: Progress) -> None:
        """Nothing: a progress line is for a screen."""

    def _stop_live(self) -> None:
        """Nothing: there is no live region."""

    def _end_answer(self) -> None:
        self._line_break()
        self._answers += self._wrote_answer

    def _write_answer(self, text: str) -> None:
        """Answer text; a blank line first between answers when nothing else (the stats line
        went to stderr) keeps them apart."""
        if not self._wrote_answer and self._answers and self.err is not self.console:
            self._write("\n")
        self._wrote_answer = True
        self._write(text)

    def _line_break(self, target: Console | None = None) -> None:
        """End the line written so far on `target`, if it is not ended."""
        file = (target or self.console).file
        if not self._line_start.get(id(file), True):
            self._write("\n", target)

    # ---- single messages -------------------------------------------------------------------

    def _line(self, text: str, style: str = "", target: Console | None = None) -> None:
        """Raw and unwrapped, on a line of its own; `style` is not shown."""
        self._line_break(target)
        self._write(text + "\n", target)

    def print_markdown(self, text: str) -> None:
        self._line_break(self.data)
        self._write(text if text.endswith("\n") else text + "\n", self.data)

    def _table(
        self,
        columns: Sequence[str],
        cells: list[list[str]],
        title: str | None,
        right_align: Sequence[str],
    ) -> None:
        self._write("".join("\t".join(row) + "\n" for row in cells), self.data)

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        yield
