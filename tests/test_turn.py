"""A turn as an object (kvrepl/chat/turn.py), with a stand-in for the conversation's generator: the
events it yields, the notes it keeps, and the one interrupt rule (Ctrl-C anywhere closes the
turn, which stores its partial answer, and the result says interrupted)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvrepl.chat.turn import Result, Turn
from kvrepl.events import Notice, Stats, TextDelta, TurnEvent

STATS = Stats(3, 4, 2, 0.1, 20.0)


def answer(stored: list[str], *, fail: BaseException | None = None):
    """What answer.Answer does, in small: fill the result; on an interrupt, store the partial
    answer, marked, and re-raise."""

    def make(result: Result) -> Iterator[TurnEvent]:
        try:
            yield Notice("cache: cut at token 3")
            yield TextDelta("Hel")
            if fail is not None:
                raise fail
            yield TextDelta("lo")
            result.finish_reason, result.stats = "stop", STATS
        except (KeyboardInterrupt, GeneratorExit):
            result.interrupted = True
            stored.append("interrupted")
            raise
        stored.append("answer")

    return make


def test_iterating_the_events_fills_the_result_and_keeps_the_notes():
    stored: list[str] = []
    turn = Turn(answer(stored))
    events = list(turn)
    assert events == [Notice("cache: cut at token 3"), TextDelta("Hel"), TextDelta("lo")]
    assert turn.result == Result(STATS, "stop", False, ["cache: cut at token 3"])
    assert stored == ["answer"]


def test_ctrl_c_in_the_consumer_closes_the_turn_as_interrupted():
    stored: list[str] = []
    seen: list[TurnEvent] = []

    def show(event: TurnEvent) -> None:
        seen.append(event)
        if event == TextDelta("Hel"):
            raise KeyboardInterrupt

    result = Turn(answer(stored)).run(show)
    assert result.interrupted and result.finish_reason is None
    assert stored == ["interrupted"] and seen[-1] == TextDelta("Hel")


def test_ctrl_c_inside_the_turn_is_not_raised_by_run():
    stored: list[str] = []
    result = Turn(answer(stored, fail=KeyboardInterrupt())).run(lambda e: None)
    assert result.interrupted and stored == ["interrupted"]


def test_another_error_closes_the_turn_and_propagates():
    stored: list[str] = []

    def show(event: TurnEvent) -> None:
        if isinstance(event, TextDelta):
            raise ValueError("the screen broke")

    turn = Turn(answer(stored))
    with pytest.raises(ValueError):
        turn.run(show)
    assert stored == ["interrupted"]  # closed: the partial answer is kept
    turn.close()  # closing again is a no-op
    assert stored == ["interrupted"]
