"""Which renderer prints a conversation: the terminal's (Live text, then Markdown) or the plain
one (raw text), picked from the console and the flags. The one module that knows both, so that
neither knows the other and render.py (what they share) knows neither.
"""

from __future__ import annotations

from rich.console import Console

from kvrepl.app.render import Renderer
from kvrepl.app.render_plain import PlainRenderer
from kvrepl.app.render_term import TermRenderer


def renderer_class(
    console: Console, *, json_lines: bool = False, plain: bool | None = None
) -> type[Renderer]:
    """Plain under --json, when `plain` says so, or (`plain` None) when `console` is not
    interactive; the terminal renderer otherwise."""
    if json_lines or ((not console.is_interactive) if plain is None else plain):
        return PlainRenderer
    return TermRenderer


def make_renderer(
    console: Console,
    *,
    err: Console | None = None,
    json_lines: bool = False,
    show_think: bool = False,
    plain: bool | None = None,
    refresh_interval: float = 0.05,
) -> Renderer:
    """The renderer for `console` (see `renderer_class`); `err` gets notices, stats and errors
    (by default `console` too)."""
    cls = renderer_class(console, json_lines=json_lines, plain=plain)
    return cls(console, err=err, json_lines=json_lines, show_think=show_think,
               refresh_interval=refresh_interval)  # fmt: skip
