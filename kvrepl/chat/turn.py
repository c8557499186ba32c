"""One turn as an object: what `send`, `edit` and `retry` return.

Iterate `turn.events` (or the turn itself) for what to show; afterwards `turn.result` holds the
stats, why the answer ended, whether it was interrupted, and the notes said on the way. `run`
drives a turn through a callback and owns the interrupt rule in one place: Ctrl-C anywhere (in
the engine or in the callback) closes the turn, which stores the partial answer, marked
interrupted, and leaves the cache matching its ids; the result then says `interrupted`. Any other
exception closes the turn the same way and propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvrepl.events import Notice, Stats, TurnEvent


@dataclass
class Result:
    """What a turn came to. `stats` is None when nothing was computed (refused, or stopped
    before its prefill began); `finish_reason` is "stop", "length" or None (not finished)."""

    stats: Stats | None = None
    finish_reason: str | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


class Turn:
    """A turn's events, produced by `make(result)`, which fills `result` as it goes."""

    def __init__(self, make: Callable[[Result], Iterator[TurnEvent]]) -> None:
        self.result = Result()
        self.events = _noting(make(self.result), self.result)

    def __iter__(self) -> Iterator[TurnEvent]:
        return self.events

    def close(self) -> None:
        """Stop the turn where it is: its partial answer is stored as interrupted (a no-op once
        it has ended)."""
        self.events.close()

    def run(self, on_event: Callable[[TurnEvent], None]) -> Result:
        """Feed every event to `on_event`; Ctrl-C ends the turn as interrupted (not raised)."""
        try:
            for event in self.events:
                on_event(event)
        except KeyboardInterrupt:
            self.close()  # a second Ctrl-C may cut the storing short: it is deferred there
            self.result.interrupted = True
        except BaseException:
            self.close()
            raise
        return self.result


def _noting(events: Iterator[TurnEvent], result: Result) -> Iterator[TurnEvent]:
    """The events, each notice also kept in `result.notes`."""
    try:
        for event in events:
            if isinstance(event, Notice):
                result.notes.append(event.text)
            yield event
    finally:
        events.close()  # type: ignore[attr-defined]
