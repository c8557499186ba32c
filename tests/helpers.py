"""Test helpers for the REPL, command and renderer tests: a Conversation over the tiny model (or
the real one) in a tmp store, a Renderer writing to a StringIO, a counter of model calls, and a
whole turn of events rendered at once."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from kvrepl.chat import Conversation
from kvrepl.commands import build_registry
from kvrepl.config import Settings
from kvrepl.events import Stats, TurnEvent
from kvrepl.handle import ModelHandle, Runtime
from kvrepl.kvstore import KVStore
from kvrepl.models import LoadedModel, ModelSource
from kvrepl.render import Renderer
from kvrepl.repl import Repl
from kvrepl.store import Store
from kvrepl.turnlines import TurnResult

WIDTH = 80
TINY_SETTINGS = Settings(temperature=0.0, max_tokens=6)


def tiny_loaded(tiny: tuple[Any, Any]) -> LoadedModel:
    """The tiny random model as a LoadedModel, with a fake fingerprint."""
    model, tok = tiny
    source = ModelSource("folder", Path("/nonexistent/tiny"), "tiny (test)")
    return LoadedModel(model, tok, source, "cpu", "float32", "tiny-fingerprint", 512)


@dataclass
class Harness:
    """One Conversation in `home`, its Repl and where its output goes. `calls` counts model
    forwards."""

    home: Path
    chat: Conversation
    repl: Repl
    out: io.StringIO
    store: Store
    calls: list[int] = field(default_factory=list)

    def text(self) -> str:
        return self.out.getvalue()

    @property
    def rt(self) -> Runtime:
        return self.chat.model.get()

    @property
    def last_stats(self) -> Stats | None:
        """The figures the store holds for the last answer of the active branch."""
        if self.chat.session is None:
            return None
        rows = self.store.turn_stats(self.chat.session.id)
        return Stats(**rows[-1][1]) if rows else None

    def take(self) -> str:
        """The output since the last take."""
        text = self.out.getvalue()
        self.out.seek(0)
        self.out.truncate()
        return text

    def run(self, *lines: str) -> str:
        """Handle each line (line mode), return what was printed."""
        self.take()
        for line in lines:
            self.repl.handle(line)
        return self.take()

    def close(self) -> None:
        self.chat.close()
        self.store.close()


def make_harness(
    home: Path,
    loaded: LoadedModel,
    *,
    settings: Settings = TINY_SETTINGS,
    interactive: bool = False,
    plain: bool = True,
    runtime: Runtime | None = None,
) -> Harness:
    """A Conversation over `loaded` in `home`; the model's forward is wrapped to count calls."""
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, force_terminal=not plain, color_system=None,
                      highlight=False)  # fmt: skip
    renderer = Renderer(console, plain=plain)
    store = Store(home / "kvrepl.db")
    kv = KVStore(home / "kv")
    rt = runtime or Runtime.build(loaded, settings)
    calls: list[int] = []
    forward = rt.engine._forward

    def counting_forward(ids: list[int]) -> Any:
        calls.append(len(ids))
        return forward(ids)

    rt.engine._forward = counting_forward  # type: ignore[method-assign]
    chat = Conversation(settings, store, kv, ModelHandle.ready_with(rt, settings), home)
    repl = Repl(chat, renderer, build_registry(), interactive=interactive)
    return Harness(home, chat, repl, out, store, calls)


def control_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's control tokens: special ones and every other added token (`<think>` in
    some vocabularies is added but not special)."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.content}
    return set(tokenizer.all_special_ids) | added


def children(store: Store, message_id: int) -> list[int]:
    """The ids of a message's replies (edits and retries are siblings), oldest first."""
    rows = store.db.query("SELECT id FROM messages WHERE parent_id = ? ORDER BY id", [message_id])
    return [r["id"] for r in rows]


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def stats_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("reused ")]


def render_events(renderer: Renderer, events: Iterable[TurnEvent]) -> TurnResult:
    """Render a whole turn: begin, feed each event, end. Ctrl-C (KeyboardInterrupt) ends it
    cleanly as interrupted; any other exception ends the display and propagates. Either way a
    generator left suspended is closed, so that its cleanup runs now."""
    renderer.begin()
    try:
        for event in events:
            renderer.feed(event)
    except KeyboardInterrupt:
        _close(events)
        return renderer.end(interrupted=True)
    except BaseException:
        _close(events)
        renderer.end(interrupted=True)
        raise
    return renderer.end()


def _close(events: Iterable[TurnEvent]) -> None:
    close = getattr(events, "close", None)
    if callable(close):
        close()
