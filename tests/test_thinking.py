"""Thinking models (issue 10, part 4), on the tiny model with a Qwen3-like template (conftest's
THINKING): it takes `enable_thinking` (off: the answer opens with an empty think block) and
drops the thinking of earlier answers. The turn after a thinking answer recomputes at most that
answer; `/think on|off` switches the mode, and the cut it causes is shown; thinking is stored
apart from the answer, hidden by default and shown on request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Harness, make_harness, tiny_loaded
from makers import make_thinking_tokenizer, make_tiny_model

from kvrepl.config import Settings
from kvrepl.export import export

SETTINGS = Settings(temperature=0.0, max_tokens=64)


@pytest.fixture(scope="module")
def thinker() -> tuple[Any, Any]:
    tok = make_thinking_tokenizer()
    return make_tiny_model(len(tok)), tok


@pytest.fixture
def h(tmp_path: Path, thinker) -> Iterator[Harness]:
    harness = make_harness(tmp_path / "store", tiny_loaded(thinker), settings=SETTINGS)
    yield harness
    harness.close()


def enc(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def end(tok: Any) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


def thought(tok: Any, think: str, answer: str) -> list[int]:
    """The ids of an answer that thinks first, as a thinking model generates them."""
    ids = tok.convert_tokens_to_ids
    return [ids("<think>"), *enc(tok, think), ids("</think>"), *enc(tok, "\n\n" + answer)]


def cached(h: Harness) -> list[int]:
    return list(h.rt.engine.pc.ids)


def test_the_turn_after_a_thinking_answer_recomputes_at_most_that_answer(h, thinker, script):
    tok = thinker[1]
    gen = thought(tok, "I should greet.", "Hello there!")
    script([*gen, end(tok)], [*enc(tok, "Fine, thanks."), end(tok)], [end(tok)])
    h.run("hi")
    answer = h.chat.history()[-1]
    assert (answer.content, answer.think) == ("Hello there!", "I should greet.")
    assert answer.token_ids == tuple(gen)  # stored whole: thinking included
    asked = len(cached(h)) - len(gen)  # the prompt the answer followed

    out = h.run("how are you?")
    # The template renders the answer without its thinking: the cache is cut where the answer
    # starts, and only the answer (now without thinking) and the new turn are computed.
    assert h.last_stats is not None and h.last_stats.reused_tokens == asked
    assert f"cache: cut at token {asked:,} (turn 1, assistant); recomputing " in out
    # An answer without thinking is rendered as its ids: the turn after it reuses it whole.
    before = len(cached(h))
    out = h.run("bye")
    assert h.last_stats.reused_tokens == before and "cache: cut" not in out


def test_think_on_and_off_switch_the_mode_with_the_cut_shown(h, thinker, script):
    tok = thinker[1]
    prompt = h.rt.prompt
    assert prompt.supports_thinking
    assert h.run("/think off") == "thinking hidden; thinking mode off\n"
    assert h.chat.settings.thinking is False
    script([*enc(tok, "Hello there!"), end(tok)], [*thought(tok, "Hmm.", "Fine."), end(tok)])
    h.run("hi")
    # Thinking off: the answer was opened with an empty think block.
    assert tok.decode(cached(h)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello there!"
    )
    assert h.run("/think on") == "thinking shown; thinking mode on\n"
    assert h.chat.settings.thinking is True
    out = h.run("how are you?")
    # The empty block is not part of the answer as history renders it: cut there, and say so.
    header = len(prompt.render([{"role": "user", "content": "hi"}], enable_thinking=True))
    assert f"cache: cut at token {header:,} (turn 1, assistant); recomputing " in out
    assert h.last_stats is not None and h.last_stats.reused_tokens == header
    gen = thought(tok, "Hmm.", "Fine.")
    asked = tok.decode(cached(h)[: -len(gen)])
    assert asked.endswith("how are you?<|im_end|>\n<|im_start|>assistant\n")  # no empty block
    assert "<think>\nHmm.\n</think>" in out  # shown: /think on shows it too


def test_thinking_is_stored_hidden_and_shown(h, thinker, script):
    tok = thinker[1]
    script(
        [*thought(tok, "I should greet.", "Hello there!"), end(tok)],
        [*thought(tok, "Now be brief.", "Fine."), end(tok)],
    )
    out = h.run("hi")
    assert "Hello there!" in out and "I should greet." not in out
    assert "(thought for 15 chars — /think to show)" in out
    assert h.run("/think") == "thinking shown\n"  # shows it, leaves the mode as it was
    assert h.chat.settings.thinking is None
    out = h.run("how are you?")
    assert "<think>\nNow be brief.\n</think>" in out and "Fine." in out
    answers = [m for m in h.chat.history() if m.role == "assistant"]
    assert [(m.content, m.think) for m in answers] == [
        ("Hello there!", "I should greet."),
        ("Fine.", "Now be brief."),
    ]
    assert h.chat.session is not None
    md = export(h.store, h.chat.session, "md")
    assert "<details><summary>thinking</summary>\n\nI should greet.\n\n</details>" in md
    # the thinking never reaches the rendering of a later turn
    assert "I should greet." not in tok.decode(cached(h))
