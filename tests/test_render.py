"""Tests for kvrepl.app.render: streaming without duplicated lines, plain mode, think panel,
stats."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from helpers import render_events
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from kvrepl.app.listing import SessionRow, format_size
from kvrepl.app.mdstream import split_finished
from kvrepl.app.render import Renderer, make_console
from kvrepl.app.render_plain import PlainRenderer
from kvrepl.app.render_term import TermRenderer
from kvrepl.app.renderers import make_renderer
from kvrepl.app.turnlines import format_stats
from kvrepl.chat.turn import Result
from kvrepl.events import Finish, Notice, Stats, TextDelta, ThinkDelta, TurnEvent

WIDTH, HEIGHT = 60, 10
STATS = Stats(
    reused_tokens=1204, prefilled_tokens=57, generated_tokens=88, ttft_s=0.211, decode_tok_s=31.42
)
STATS_LINE = "reused 1,204 · prefilled 57 · generated 88 · ttft 0.21 s · 31.4 tok/s"

ANSWER = """# Heading alpha01

First paragraph bravo02 runs on for a while so that it wraps over
more than one line of the narrow sixty column console charlie03.

Second paragraph delta04 with *emphasis* and `inline code` echo05.

- list item foxtrot06
- list item golf07
- list item hotel08

```python
def india09():
    x = 1

    y = 2


    return juliet10
```

Third paragraph kilo11 after the code fence.

---

Fourth paragraph lima12, then a numbered list:

1. one mike13
2. two november14

Closing words oscar15 papa16.
"""
MARKERS = re.findall(r"[a-z]+\d\d", ANSWER)


class Screen:
    """A tiny terminal: enough of CR, LF, cursor up, erase line and column moves to replay what
    rich writes. Like a real terminal, the cursor cannot move above the top of the visible
    screen, which is what makes a too-tall Live leave duplicated lines behind (rich #3263)."""

    _CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
    _OSC = re.compile(r"\x1b\].*?(?:\x1b\\|\x07)")

    def __init__(self, height: int) -> None:
        self.height = height
        self.lines: list[list[str]] = [[]]
        self.row = self.col = 0

    def feed(self, data: str) -> Screen:
        data = self._OSC.sub("", data)
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                match = self._CSI.match(data, i)
                assert match, repr(data[i : i + 10])
                self._control(*match.groups())
                i = match.end()
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
                self.col = 0
                if self.row == len(self.lines):
                    self.lines.append([])
            else:
                line = self.lines[self.row]
                line.extend(" " * (self.col + 1 - len(line)))
                line[self.col] = ch
                self.col += 1
            i += 1
        return self

    def _control(self, params: str, command: str) -> None:
        n = int(params) if params.isdigit() else 1
        top = max(0, len(self.lines) - self.height)
        if command == "A":
            self.row = max(top, self.row - n)
        elif command == "K":
            line = self.lines[self.row]
            self.lines[self.row] = [] if params == "2" else line[: self.col]
        elif command == "G":
            self.col = n - 1
        # Colours (m) and cursor visibility (?25h/l) change nothing on the page.

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines).strip("\n")


def tty_console() -> Console:
    return Console(
        file=io.StringIO(),
        width=WIDTH,
        height=HEIGHT,
        force_terminal=True,
        color_system="truecolor",
    )


def plain_console() -> Console:
    return Console(file=io.StringIO(), width=WIDTH, height=HEIGHT, force_terminal=False)


def output(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def screen_of(console: Console) -> str:
    return Screen(HEIGHT).feed(output(console)).text()


def split_stats(screen: str) -> tuple[str, str]:
    """(everything above the stats line, the stats line unwrapped): rich wraps it at 60 columns."""
    body, found, line = screen.rpartition("reused ")
    if not found:
        body, _, line = screen.rpartition("\n")
        return body.rstrip(), line
    return body.rstrip(), " ".join((found + line).split())


def deltas(text: str, sizes: tuple[int, ...] = (3, 5, 2, 7, 4)) -> list[str]:
    pieces, i, k = [], 0, 0
    while i < len(text):
        pieces.append(text[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return pieces


def answer_events(text: str = ANSWER) -> list[TurnEvent]:
    return [*(TextDelta(d) for d in deltas(text)), Finish("stop"), STATS]


def static_markdown(text: str) -> str:
    console = tty_console()
    console.print(Markdown(text))
    return screen_of(console)


# ---- which renderer -----------------------------------------------------------------------


def test_the_console_or_the_flags_choose_the_renderer() -> None:
    tty, plain = tty_console(), plain_console()
    for make in (make_renderer,):
        assert type(make(tty)) is TermRenderer and type(make(plain)) is PlainRenderer
        assert type(make(tty, plain=True)) is PlainRenderer
        assert type(make(plain, plain=False)) is TermRenderer
        assert type(make(tty, json_lines=True, plain=False)) is PlainRenderer
    r = make_renderer(tty, err=plain, show_think=True, refresh_interval=0)
    assert isinstance(r, Renderer) and r.err is plain and r.show_think and not r.plain
    assert PlainRenderer(tty).plain  # a renderer made by its own class stays that class


# ---- the emulator itself -----------------------------------------------------------------


def test_screen_reproduces_rich_3263_with_a_naive_live() -> None:
    console = tty_console()
    with Live(console=console, auto_refresh=False, vertical_overflow="visible") as live:
        text = ""
        for piece in deltas(ANSWER):
            text += piece
            live.update(Markdown(text), refresh=True)
    screen = screen_of(console)
    assert max(screen.count(marker) for marker in MARKERS) > 1


# ---- streaming in a terminal -------------------------------------------------------------


@pytest.mark.parametrize("refresh_interval", [0, 0.05])
def test_streamed_answer_taller_than_screen_has_every_line_once(refresh_interval: float) -> None:
    console = tty_console()
    renderer = make_renderer(console, refresh_interval=refresh_interval)
    result = render_events(renderer, answer_events())
    screen = screen_of(console)
    for marker in MARKERS:
        assert screen.count(marker) == 1, marker
    body, line = split_stats(screen)
    assert line == STATS_LINE
    assert body == static_markdown(ANSWER)
    assert result.text == ANSWER and result.stats == STATS and not result.interrupted


MIXED = """> a quote sierra19

- after quote tango20

---

- after rule uniform21

| col | val |
|-----|-----|
| victor22 | 1 |

## heading whiskey23
```
fence right after heading xray24
```
1. starts yankee25

   continued zulu26
2. second item
"""


def test_block_spacing_matches_rendering_the_whole_text_at_once() -> None:
    console = tty_console()
    render_events(make_renderer(console, refresh_interval=0), answer_events(MIXED))
    body, line = split_stats(screen_of(console))
    assert body == static_markdown(MIXED) and line == STATS_LINE


def test_long_code_fence_is_cropped_live_and_printed_once() -> None:
    code = "\n".join(f"line_{i:02d} = {i}" + ("\n" if i % 7 == 0 else "") for i in range(40))
    text = f"Intro text.\n\n```python\n{code}\n```\n\nAfter the fence.\n"
    console = tty_console()
    render_events(make_renderer(console, refresh_interval=0), answer_events(text))
    screen = screen_of(console)
    for i in range(40):
        assert screen.count(f"line_{i:02d} =") == 1, i
    assert screen.count("After the fence.") == 1


class CountingConsole(Console):
    """A terminal console that notes, for each Markdown it renders, its lines of source."""

    def __init__(self) -> None:
        super().__init__(file=io.StringIO(), width=WIDTH, height=HEIGHT, force_terminal=True,
                         color_system="truecolor")  # fmt: skip
        self.markdown_lines: list[int] = []

    def render_lines(self, renderable: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(renderable, Markdown):
            self.markdown_lines.append(renderable.markup.count("\n") + 1)
        return super().render_lines(renderable, *args, **kwargs)


def test_a_growing_code_block_is_not_redrawn_whole() -> None:
    """Each redraw of the live tail renders about a screenful of the block, however long it has
    grown (redrawing it whole took over a minute); the finished block is rendered once."""
    code = "\n".join(f"value_{i:03d} = compute({i}, 'text')" for i in range(300))
    text = f"```python\n{code}\n```\n\nDone.\n"
    console = CountingConsole()
    pieces = deltas(text, (160,))  # about five lines a piece
    render_events(make_renderer(console, refresh_interval=0), [*map(TextDelta, pieces), STATS])
    redraws = [n for n in console.markdown_lines if n <= HEIGHT + 2]
    whole = [n for n in console.markdown_lines if n > HEIGHT + 2]
    assert len(redraws) >= len(pieces)  # the tail was redrawn live for every piece
    assert len(whole) == 1 and whole[0] > 300  # the block, printed once when finished
    screen = screen_of(console)
    assert all(screen.count(f"value_{i:03d} =") == 1 for i in range(300))


def test_interrupted_mid_stream_prints_partial_text_once() -> None:
    console = tty_console()
    renderer = make_renderer(console, refresh_interval=0)
    cut = ANSWER.index("return juliet10")  # inside the open code fence
    renderer.begin()
    for piece in deltas(ANSWER[:cut]):
        renderer.feed(TextDelta(piece))
    result = renderer.end(Result(stats=STATS, interrupted=True))
    screen = screen_of(console)
    for marker in MARKERS:
        assert screen.count(marker) == (1 if marker in ANSWER[:cut] else 0), marker
    assert split_stats(screen)[1] == STATS_LINE + " · interrupted"
    assert result.interrupted and result.text == ANSWER[:cut]


def test_keyboard_interrupt_inside_the_event_loop_ends_cleanly() -> None:
    closed = []

    def events() -> Iterator[TurnEvent]:
        try:
            yield from (TextDelta(d) for d in deltas(ANSWER[:200]))
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    console = tty_console()
    result = render_events(make_renderer(console, refresh_interval=0), events())
    screen = screen_of(console)
    assert screen.count("bravo02") == 1 and "juliet10" not in screen
    assert split_stats(screen)[1] == "interrupted"
    assert result.interrupted and closed == [True]


def test_end_twice_and_end_without_begin_are_harmless() -> None:
    console = tty_console()
    renderer = make_renderer(console)
    assert renderer.end().text == ""
    renderer.feed(TextDelta("hi"))
    renderer.end(Result(stats=STATS))
    renderer.end()
    assert split_stats(screen_of(console)) == ("hi", STATS_LINE)


def test_think_panel_shown_when_on() -> None:
    console = tty_console()
    events = [ThinkDelta("pondering "), ThinkDelta("quebec17"), *answer_events("Answer romeo18.")]
    result = render_events(make_renderer(console, show_think=True, refresh_interval=0), events)
    screen = screen_of(console)
    assert screen.count("quebec17") == 1 and screen.count("romeo18") == 1
    assert "thinking" in screen.splitlines()[0]
    assert screen.index("quebec17") < screen.index("romeo18")
    assert result.think == "pondering quebec17"


def test_think_hidden_when_off() -> None:
    console = tty_console()
    events = [ThinkDelta("pondering "), ThinkDelta("quebec17"), *answer_events("Answer romeo18.")]
    render_events(make_renderer(console, show_think=False, refresh_interval=0), events)
    screen = screen_of(console)
    assert "quebec17" not in screen
    assert "(thought for 18 chars — /think to show)" in screen
    assert screen.count("romeo18") == 1


def test_notice_is_one_line_before_the_answer() -> None:
    console = tty_console()
    note = "cache: 1,204 tokens reused, cut at turn 3, recomputing 57"
    render_events(make_renderer(console), [Notice(note), *answer_events("Hi.")])
    assert split_stats(screen_of(console)) == (f"{note}\nHi.", STATS_LINE)


# ---- plain mode --------------------------------------------------------------------------


def test_plain_output_is_the_deltas_and_the_stats_line() -> None:
    console = plain_console()
    renderer = make_renderer(console)
    assert renderer.plain
    result = render_events(renderer, answer_events())
    assert output(console) == ANSWER + STATS_LINE + "\n"
    assert "\x1b" not in output(console)
    assert result.text == ANSWER


def test_plain_adds_a_newline_before_stats_and_marks_interruption() -> None:
    console = plain_console()
    renderer = make_renderer(console)
    renderer.feed(TextDelta("partial ans"))
    renderer.end(Result(stats=STATS, interrupted=True))
    assert output(console) == f"partial ans\n{STATS_LINE} · interrupted\n"


def test_plain_notice_mid_line_starts_a_new_line() -> None:
    console = plain_console()
    events = [TextDelta("abc"), Notice("note"), TextDelta("def"), STATS]
    render_events(make_renderer(console), events)
    assert output(console) == f"abc\nnote\ndef\n{STATS_LINE}\n"


def test_plain_think_shown_and_hidden() -> None:
    events = [ThinkDelta("hmm"), TextDelta("Yes."), STATS]
    shown = plain_console()
    render_events(make_renderer(shown, show_think=True), events)
    assert output(shown) == f"<think>\nhmm\n</think>\nYes.\n{STATS_LINE}\n"
    hidden = plain_console()
    render_events(make_renderer(hidden), events)
    assert output(hidden) == f"(thought for 3 chars — /think to show)\nYes.\n{STATS_LINE}\n"


def test_make_console_plain_has_no_ansi(monkeypatch: pytest.MonkeyPatch) -> None:
    file = io.StringIO()
    console = make_console(file, plain=True, width=WIDTH)
    renderer = make_renderer(console)
    assert renderer.plain
    renderer.error("boom")
    renderer.print_markdown("# Title\n\n**bold**")
    assert file.getvalue() == "error: boom\n# Title\n\n**bold**\n"
    monkeypatch.setenv("NO_COLOR", "1")
    coloured = make_console(io.StringIO(), plain=False, width=WIDTH)
    make_renderer(coloured).error("boom")
    assert "\x1b[31" not in output(coloured) and "error: boom" in output(coloured)


def test_error_is_red_in_a_terminal_and_markup_is_not_interpreted() -> None:
    console = tty_console()
    make_renderer(console).error("bad [bold]input[/bold]")
    assert "\x1b[" in output(console)
    assert screen_of(console) == "error: bad [bold]input[/bold]"


# ---- stats, tables, helpers --------------------------------------------------------------


def test_format_stats() -> None:
    assert format_stats(STATS) == STATS_LINE
    assert format_stats(STATS, interrupted=True) == STATS_LINE + " · interrupted"
    assert format_stats(STATS, hit_max_tokens=True).endswith(" · max tokens")
    assert format_stats(None, interrupted=True) == "interrupted"
    assert format_stats(None) == ""


def test_length_finish_shows_max_tokens() -> None:
    console = plain_console()
    render_events(make_renderer(console), [TextDelta("x\n"), Finish("length"), STATS])
    assert output(console).endswith(f"{STATS_LINE} · max tokens\n")


def test_split_finished_never_splits_inside_an_open_fence() -> None:
    assert split_finished("one\n\ntwo") == ("", "one\n\ntwo")  # "two" may become "two\n==="
    assert split_finished("one\n\ntwo\n") == ("one\n\n", "two\n")
    assert split_finished("para\n\n```\na\n\nb\n") == ("para\n\n", "```\na\n\nb\n")
    fence = "```\na\n\nb\n```\n"
    assert split_finished(fence + "\nnext\n") == (fence + "\n", "next\n")
    assert split_finished("- a\n\n- b\n") == ("", "- a\n\n- b\n")
    assert split_finished("no newline yet") == ("", "no newline yet")


def test_sessions_listing_plain_and_table() -> None:
    rows = [
        SessionRow("work", "Refactor", 3, 1204, 1200, datetime(2025, 1, 2, 3, 4), 5 * 1024 * 1024),
        SessionRow("scratch", "", 0, 0, 0, "2025-01-01 00:00", None),
        SessionRow("epoch", "t", 1, 9, 9, datetime(2025, 5, 6, 7, 8).timestamp(), 100),
    ]
    plain = plain_console()
    make_renderer(plain).print_sessions(rows, current="work", pool_bytes=5 * 1024 * 1024 + 10)
    assert output(plain) == (
        "work\tRefactor\t3\t1204\t1200\t5.0 MiB\t2025-01-02 03:04\n"
        "scratch\t\t0\t0\t0\t-\t2025-01-01 00:00\n"
        "epoch\tt\t1\t9\t9\t100 B\t2025-05-06 07:08\n"
        "all sessions: 5.0 MiB of K/V on disk; a chunk sessions share counts in each one's \"on "
        'disk", once here\n'
    )
    tty = tty_console()
    make_renderer(tty).print_sessions(rows, current="work")
    screen = screen_of(tty)
    assert "* work" in screen and "1,204" in screen and "1,200" in screen
    assert all(column in screen for column in ("turns", "tokens", "cached", "on disk"))
    alone = plain_console()
    make_renderer(alone).print_sessions(rows[:2], pool_bytes=5 * 1024 * 1024)  # one with chunks
    assert "all sessions" not in output(alone)


def test_format_size() -> None:
    assert format_size(None) == "-"
    assert format_size(512) == "512 B"
    assert format_size(2048) == "2.0 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"


def test_status_is_silent_in_plain_mode() -> None:
    console = plain_console()
    with make_renderer(console).status("loading model"):
        pass
    assert output(console) == ""
