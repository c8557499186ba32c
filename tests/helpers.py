"""Test helpers: one harness (a Conversation over the tiny model, or any other, in a tmp store,
its Repl and a Renderer writing to a StringIO; the model reached through a probe that counts its
forwards), a Conversation alone, and a whole turn of events rendered at once."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes import ModelProbe
from rich.console import Console

from kvrepl.app.commands import build_registry
from kvrepl.app.render import Renderer, make_console
from kvrepl.app.renderers import make_renderer
from kvrepl.app.repl import Repl
from kvrepl.app.turnlines import TurnResult
from kvrepl.chat.conversation import Conversation
from kvrepl.chat.handle import ModelHandle, Runtime
from kvrepl.chat.turn import Result, Turn
from kvrepl.config import Settings
from kvrepl.engine.models import LoadedModel, ModelSource
from kvrepl.events import Finish, Stats, TurnEvent
from kvrepl.store.db import Store
from kvrepl.store.kvstore import KVStore

WIDTH = 80
TINY_SETTINGS = Settings(temperature=0.0, max_tokens=6)


def tiny_loaded(tiny: tuple[Any, Any]) -> LoadedModel:
    """The tiny random model as a LoadedModel, with a fake fingerprint."""
    model, tok = tiny
    source = ModelSource("folder", Path("/nonexistent/tiny"), "tiny (test)")
    return LoadedModel(model, tok, source, "cpu", "float32", "tiny-fingerprint", 512)


def open_conversation(
    loaded: LoadedModel,
    home: Path,
    settings: Settings,
    *,
    store: Store | None = None,
    kv: KVStore | None = None,
) -> Conversation:
    """A Conversation over `loaded` in `home`, with its own engine (a fresh process, as far as
    the cache goes); `store` and `kv` are the stores it is given (by default new ones in
    `home`). Close it with `close_conversation`."""
    rt = Runtime.build(loaded, settings)
    return Conversation(settings, store or Store(home / "kvrepl.db"), kv or KVStore(home / "kv"),
                        ModelHandle.ready_with(rt, settings), home)  # fmt: skip


def close_conversation(chat: Conversation) -> None:
    chat.close()
    chat.store.close()


@dataclass
class Harness:
    """One Conversation in `home`, its Repl and where its output goes. The engine runs the model
    through a probe (`model`): `calls` holds the number of ids of each forward, and
    `model.raise_at` breaks one; `streams` holds the prompt ids of each engine stream. `loaded`
    is the model as given (the runtime's holds the probe)."""

    home: Path
    loaded: LoadedModel
    settings: Settings
    chat: Conversation
    repl: Repl
    out: io.StringIO
    store: Store
    kv: KVStore
    rt: Runtime
    model: ModelProbe
    streams: list[list[int]] = field(default_factory=list)

    @property
    def calls(self) -> list[int]:
        return self.model.calls

    @property
    def sid(self) -> str:
        assert self.chat.session is not None
        return self.chat.session.id

    @property
    def last_stats(self) -> Stats | None:
        """The figures the store holds for the last answer of the active branch."""
        if self.chat.session is None:
            return None
        rows = self.store.turn_stats(self.chat.session.id)
        return Stats(**rows[-1][1]) if rows else None

    def text(self) -> str:
        return self.out.getvalue()

    def take(self) -> str:
        """The output since the last take."""
        text = self.out.getvalue()
        self.out.seek(0)
        self.out.truncate()
        return text

    def run(self, *lines: str) -> str:
        """Handle each line (line mode), return what was printed (since the last take)."""
        self.take()
        for line in lines:
            self.repl.handle(line)
        return self.take()

    def line(self, text: str) -> str:
        """Handle one line as the line loop does; return what it printed. The REPL must go on."""
        start = len(self.out.getvalue())
        assert self.repl.handle(text) is True, f"the REPL ended on {text!r}"
        return self.out.getvalue()[start:]

    def lines(self, *texts: str) -> str:
        return "".join(self.line(t) for t in texts)

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
    width: int = WIDTH,
    store: Callable[[Path], Store] = Store,
    kv: Callable[[Path], KVStore] = KVStore,
) -> Harness:
    """A Conversation over `loaded` in `home` and its Repl. `store` and `kv` make the stores
    from their paths (a subclass there sees the moments it overrides)."""
    out = io.StringIO()
    if plain:
        console = make_console(out, plain=True, width=width)
    else:
        console = Console(file=out, width=width, force_terminal=True, color_system=None,
                          highlight=False)  # fmt: skip
    renderer = make_renderer(console, plain=plain)
    probe = ModelProbe(loaded.model)
    rt = Runtime.build(dataclasses.replace(loaded, model=probe), settings)
    db, snapshots = store(home / "kvrepl.db"), kv(home / "kv")
    chat = Conversation(settings, db, snapshots, ModelHandle.ready_with(rt, settings), home)
    repl = Repl(chat, renderer, build_registry(), interactive=interactive)
    h = Harness(home, loaded, settings, chat, repl, out, db, snapshots, rt, probe)
    stream = rt.engine.stream

    def recording_stream(ids: Any, sampling: Any, **kwargs: Any) -> Any:
        h.streams.append(list(ids))
        return stream(ids, sampling, **kwargs)

    rt.engine.stream = recording_stream  # type: ignore[method-assign]  # public: what it is given
    return h


def tree(d: Path) -> dict[str, bytes]:
    """Every file under d, path -> bytes (a symbolic link: its target's name, never followed)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(d))] = p.read_bytes()
    return out


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


def render_events(renderer: Renderer, events: Turn | Iterable[TurnEvent]) -> TurnResult:
    """Render a whole turn: begin, feed each event, end. A Turn's figures come from its result,
    as the REPL shows them; a list's from its Finish and Stats events, as an engine yields them.
    Ctrl-C (KeyboardInterrupt) ends it cleanly as interrupted; any other exception ends the
    display and propagates. Either way a generator left suspended is closed, so that its cleanup
    runs now."""
    renderer.begin()
    if isinstance(events, Turn):
        done = None
        try:
            done = events.run(renderer.feed)
        finally:
            shown = renderer.end(done)
        return shown
    result = Result()
    try:
        for event in events:
            if isinstance(event, Finish):
                result.finish_reason = event.reason
            elif isinstance(event, Stats):
                result.stats = event
            else:
                renderer.feed(event)
    except BaseException as exc:
        _close(events)
        result.interrupted = True
        shown = renderer.end(result)
        if isinstance(exc, KeyboardInterrupt):
            return shown
        raise
    return renderer.end(result)


def _close(events: Iterable[TurnEvent]) -> None:
    close = getattr(events, "close", None)
    if callable(close):
        close()


def fill_cache(pc: Any, ids: list[int], layers: list[tuple[Any, Any]]) -> None:
    """Fill a prompt cache with per-layer (keys, values) of all `ids`, through the door a
    snapshot comes in by (`extend`), after emptying it."""
    pc.keep_first(0)
    pc.extend(ids, [[kv] for kv in layers])
