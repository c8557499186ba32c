"""The conversation's own lines: the cut notice (said when the cache is cut back, never on every
turn under --no-reuse, in the singular for one token) and the one context check's wording."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from helpers import make_harness, tiny_loaded

from kvrepl.app.turnlines import format_stats
from kvrepl.chat.answer import _tokens
from kvrepl.config import Settings
from kvrepl.context import check_fits
from kvrepl.errors import PromptError

SETTINGS = Settings(temperature=0.0, max_tokens=4)


@pytest.mark.parametrize("reuse", [True, False])
def test_the_cut_line_is_said_only_when_reuse_cuts(reuse, tiny, tmp_path: Path):
    h = make_harness(tmp_path / "h", tiny_loaded(tiny), settings=dataclasses.replace(
        SETTINGS, reuse=reuse))  # fmt: skip
    try:
        out = h.run("hello there", "and again", "/edit 1 hello here")
    finally:
        h.chat.close()
    assert ("cache: cut at token" in out) == reuse, out


def test_one_token_is_one_token():
    assert _tokens(1) == "1 token" and _tokens(2) == "2 tokens" and _tokens(1234) == "1,234 tokens"


def test_one_context_check_for_a_message_and_a_conversation():
    check_fits("message", 240, 256)
    with pytest.raises(PromptError, match="this message is 241 tokens"):
        check_fits("message", 241, 256)
    with pytest.raises(PromptError, match="the conversation is 300 tokens.*/new"):
        check_fits("conversation", 300, 256)
    with pytest.raises(PromptError, match="the messages are 300 tokens.*shorten them"):
        check_fits("request", 300, 256)
    check_fits("conversation", 255, 256, room=1)  # the engine's guard: a position to answer in
    with pytest.raises(PromptError, match="the conversation is 256 tokens"):
        check_fits("conversation", 256, 256, room=1)


def test_the_first_turns_ttft_counts_from_enter_and_says_the_wait(tiny, tmp_path: Path):
    """Enter pressed 2 s ago, 1.5 s of them waiting for the model: the ttft holds both, the line
    says how much was the load, and the store keeps the five figures alone."""
    h = make_harness(tmp_path / "h", tiny_loaded(tiny), settings=SETTINGS)
    try:
        turn = h.chat.send("hello", started=time.perf_counter() - 2.0, waited=1.5)
        list(turn)
        stats = turn.result.stats
        assert stats is not None and stats.ttft_s >= 2.0 and stats.model_wait_s == 1.5
        assert f"ttft {stats.ttft_s:.2f} s (1.5 s of it loading the model)" in format_stats(stats)
        (_, stored), = h.store.turn_stats(h.chat.session.id)
        assert "model_wait_s" not in stored and stored["ttft_s"] >= 2.0
        again = h.chat.send("and again")
        list(again)
        assert again.result.stats.model_wait_s == 0.0
        assert "loading the model" not in format_stats(again.result.stats)
    finally:
        h.chat.close()
