"""The input's folded view: a line of the prompt's text too tall for the screen is shown as its
start (beside the prompt), a marker for what is left out (`… 4,210 characters …`) and the part
around the cursor. Display only: the text itself is untouched, and Enter sends all of it.

Why: prompt-toolkit scrolls its input by whole lines. After a paste taller than the screen that
ends in a newline, the cursor's (empty) line is shown alone at the top and the screen looks
blank: no prompt, no text. Folded, every line fits, so the prompt, the text and the cursor stay
on screen whatever the paste's size. Part of the REPL room (keys.py installs it); no key
bindings here.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate

from prompt_toolkit.application.current import get_app
from prompt_toolkit.formatted_text.utils import fragment_list_width
from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput
from prompt_toolkit.layout.utils import explode_text_fragments
from prompt_toolkit.utils import get_cwidth

RESERVED_ROWS = 2  # the toolbar, and a row to spare
MIN_ROWS = 3  # a line is never folded below this many rows
MARKER_COLS = 32  # room kept for each marker


@dataclass(frozen=True)
class Fold:
    """What of a line is shown, in the line's display positions: [0, head) and [start, end),
    with a marker for each gap."""

    head: int
    start: int
    end: int
    length: int

    def markers(self) -> tuple[str, str]:
        """The markers of the gaps before and after the part shown ("" where none)."""
        return _marker(self.start - self.head), _marker(self.length - self.end)

    def to_shown(self, i: int) -> int:
        """A position of the line as the folded line shows it (a hidden one: at its marker)."""
        first, _ = self.markers()
        if i < self.head:
            return i
        if i < self.start:
            return self.head
        return self.head + len(first) + min(i, self.end) - self.start

    def to_line(self, j: int) -> int:
        """A position of the folded line in the line (a marker's: the first shown after it)."""
        first, _ = self.markers()
        if j < self.head:
            return j
        j -= self.head + len(first)
        if j < 0:
            return self.start
        return min(self.start + j, self.end)


def _marker(hidden: int) -> str:
    return f" … {hidden:,} characters … " if hidden else ""


def plan_fold(widths: list[int], cursor: int, rows: int, width: int, prefix: int) -> Fold | None:
    """The fold of a line whose characters are `widths` columns wide, to fit in `rows` rows of
    `width` columns after a prefix of `prefix` columns (the prompt), keeping `cursor` shown;
    None when it fits as it is."""
    ends = list(accumulate(widths))  # ends[i]: columns up to and including character i
    total = ends[-1] if ends else 0
    if prefix + total <= rows * width:
        return None
    head = bisect_right(ends, width - prefix) if width > prefix else 0  # the prompt's row
    budget = max(width, (rows - 1) * width - 2 * MARKER_COLS - width)  # a row of slack for wraps

    def col(i: int) -> int:  # columns before character i
        return ends[i - 1] if i > 0 else 0

    cursor = min(max(cursor, 0), len(widths))
    end = len(widths)
    if total - col(cursor) > budget * 3 // 4:  # far from the end: a quarter shown after it
        end = bisect_left(ends, col(cursor) + budget // 4)
    start = min(bisect_left(ends, col(end) - budget) + 1, cursor)  # the budget, ending at end
    return Fold(head, max(start, head), end, len(widths))


class FoldTallLines(Processor):
    """Folds each line of the input that would take more rows than its share of the screen:
    the screen's rows (less the toolbar's) over the number of lines, at least MIN_ROWS."""

    def __init__(self, prompt_width: int) -> None:
        self.prompt_width = prompt_width

    def apply_transformation(self, ti: TransformationInput) -> Transformation:
        fragments = ti.fragments
        prefix = self.prompt_width if ti.lineno == 0 else 0
        rows = get_app().output.get_size().rows
        share = max(MIN_ROWS, (rows - RESERVED_ROWS) // max(1, ti.document.line_count))
        if prefix + fragment_list_width(fragments) <= share * ti.width:
            return Transformation(fragments)
        chars = explode_text_fragments(fragments)
        on_cursor_line = ti.lineno == ti.document.cursor_position_row
        cursor = ti.source_to_display(ti.document.cursor_position_col) if on_cursor_line else 0
        widths = [0 if "[ZeroWidthEscape]" in f[0] else get_cwidth(f[1]) for f in chars]
        fold = plan_fold(widths, cursor if on_cursor_line else len(chars), share, ti.width,
                         prefix)  # fmt: skip
        if fold is None:
            return Transformation(fragments)
        first, second = fold.markers()
        shown = [*chars[: fold.head], *_marked(first), *chars[fold.start : fold.end],
                 *_marked(second)]  # fmt: skip
        return Transformation(shown, source_to_display=fold.to_shown,
                              display_to_source=fold.to_line)  # fmt: skip


def _marked(marker: str) -> list[tuple[str, str]]:
    return [("class:fold", marker)] if marker else []
