"""Streamed Markdown on a terminal: which part of the text is finished, and how a piece of it
looks when printed after what came before.

Long answers are streamed without rich's Live duplicating lines once the text is taller than the
terminal (rich issue #3263): finished Markdown blocks are printed once, above the live region, and
only the unfinished tail stays live, cropped to the terminal height. This module owns that
machinery: splitting streamed text into finished blocks and the tail, rendering a piece as the
continuation of what was printed before it, and the cropped live region.

Never prints, keeps no state between calls and knows nothing of turns, thinking or stats: the
terminal renderer (render_term.py) decides what to print and when.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.segment import Segment

if TYPE_CHECKING:
    from rich.markdown import Markdown

_FENCE = re.compile(r" {0,3}(```|~~~)")
_TABLE_RULE = re.compile(r"\s*\|?\s*:?-+:?\s*\|[\s|:-]*$")


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


@functools.cache
def _parser() -> Any:
    """The same parser configuration rich's Markdown uses, so our block boundaries match its
    rendering. Made at the first answer: markdown-it costs ~20 ms on the way to the prompt."""
    from markdown_it import MarkdownIt

    return MarkdownIt().enable("strikethrough").enable("table")


def markdown(text: str) -> Markdown:
    """rich's Markdown of `text` (rich.markdown is imported at the first answer, not before the
    prompt: ~40 ms)."""
    from rich.markdown import Markdown

    return Markdown(text)


def _block_starts(markdown: str) -> list[int]:
    """The first line of each top-level block (closing tokens carry no line map)."""
    return [t.map[0] for t in _parser().parse(markdown) if t.level == 0 and t.map is not None]


def last_block_stub(markdown: str) -> str:
    """A short block of the same kind as the last block of `markdown`: the spacing after a block
    depends on its kind only, and a long code block should not be rendered again to learn it."""
    starts = _block_starts(markdown)
    lines = markdown.rstrip().splitlines(keepends=True)[starts[-1] :] if starts else []
    return "".join(lines[:2] + lines[-1:] if len(lines) > 3 else lines) + "\n\n"


def tail_source(text: str, max_lines: int) -> str:
    """The end of an unfinished block, enough to fill the screen: redrawing a growing code block
    whole would cost more on every refresh. A fence keeps its opening line, a table its header."""
    lines = text.lstrip("\n").splitlines(keepends=True)
    if len(lines) <= max_lines + 2:
        return text
    head = lines[:1] if _FENCE.match(lines[0]) else []
    head = lines[:2] if _TABLE_RULE.match(lines[1]) else head
    return "".join(head + lines[-max_lines:])


class Continuation:
    """Markdown `text` as it looks after `before` in one document: rich's spacing between blocks
    depends on both (a list brings its own blank line), so render both and drop `before`'s lines.
    The live tail, redrawn often, takes the cheap way: one blank line in between."""

    def __init__(self, before: str, text: str, *, exact: bool = True) -> None:
        self.before, self.text, self.exact = before, text, exact

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        options = options.update(height=None)
        if not self.before:
            lines = console.render_lines(markdown(self.text), options, pad=False)
        elif self.exact:
            skip = len(console.render_lines(markdown(self.before), options, pad=False))
            combined = markdown(self.before + self.text)
            lines = console.render_lines(combined, options, pad=False)[skip:]
        else:
            lines = console.render_lines(markdown(self.text), options, pad=False)
            while lines and not any(segment.text for segment in lines[0]):
                lines.pop(0)
            lines.insert(0, [])
        for line in lines:
            yield from line
            yield Segment.line()


class LiveTail:
    """The live region: whatever `view()` shows now, cut to its last lines so that it is never
    taller than the terminal (a taller Live cannot move the cursor back up: #3263)."""

    def __init__(self, view: Callable[[], RenderableType]) -> None:
        self._view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        view = self._view()
        lines = console.render_lines(view, options.update(height=None), pad=False)
        keep = max(1, options.size.height - 1)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()
