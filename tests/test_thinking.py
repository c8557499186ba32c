"""Thinking models (issue 10, part 4), on the tiny model with a Qwen3-like template (conftest's
THINKING): it takes `enable_thinking` (off: the answer opens with an empty think block) and
drops the thinking of earlier answers. The turn after a thinking answer recomputes at most that
answer; `/think on|off` switches the mode, and the cut it causes is shown; thinking is stored
apart from the answer, hidden by default and shown on request."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Harness, make_harness, tiny_loaded
from makers import THINKING, make_thinking_tokenizer, make_tiny_model
from test_promise import assert_bitwise, recompute

from kvrepl.app.export import export
from kvrepl.chat.prompt import Prompt
from kvrepl.chat.thinkbudget import ThinkBudget, close_ids
from kvrepl.config import Settings
from kvrepl.engine.engine import Engine, Sampling

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
    md = export(h.chat.session, h.chat.transcript(h.chat.session), "md")
    assert "<details><summary>thinking</summary>\n\nI should greet.\n\n</details>" in md
    # the thinking never reaches the rendering of a later turn
    assert "I should greet." not in tok.decode(cached(h))


# ---------------------------------------------------------------------------------------------
# the think budget (`--think-budget N`, `/set think_budget N`)


def close(h: Harness) -> list[int]:
    """The ids of the close the budget forces: the template's `</think>` and blank line."""
    ids = close_ids(h.rt.prompt)
    assert h.rt.prompt.tokenizer.decode(ids) == "</think>\n\n"
    return ids


def test_a_think_budget_closes_the_thinking_and_the_answer_goes_on(h, thinker, script):
    tok = thinker[1]
    assert h.run("/set think_budget 5") == "think_budget = 5 for this session\n"
    thinking = enc(tok, "one two three four five six seven eight")[:5]
    answer = enc(tok, "Hello there!")
    # Forced tokens take no sampling step: the script goes on with `answer` after the close.
    # Unbudgeted, `answer` would be thinking, and the answer would be empty.
    script([tok.convert_tokens_to_ids("<think>"), *thinking, *answer, end(tok)])
    out = h.run("hi")
    stored = h.chat.history()[-1]
    # Five tokens of thinking, the close forced after them, then the answer from the script.
    want = [tok.convert_tokens_to_ids("<think>"), *thinking, *close(h), *answer]
    assert stored.token_ids == tuple(want)
    assert (stored.content, stored.think) == ("Hello there!", tok.decode(thinking))
    assert h.last_stats is not None and h.last_stats.generated_tokens == len(want)
    assert "thinking cut at 5 tokens (think_budget)\n" in out
    assert f"(thought for {len(tok.decode(thinking).strip()):,} chars" in out
    assert out.index("thinking cut at") < out.index("Hello there!")
    assert list(cached(h)[-len(want) :]) == want  # the cache holds the forced ids as fed


def test_a_cut_thinking_is_shown_whole_in_its_panel_then_the_answer(h, thinker, script):
    tok = thinker[1]
    h.run("/think", "/set think_budget 4")
    thinking, answer = enc(tok, "caches keys values tokens prefix")[:4], enc(tok, "Paris.")
    script([tok.convert_tokens_to_ids("<think>"), *thinking, *answer, end(tok)])
    out = h.run("hi")
    thought_text = tok.decode(thinking).strip()
    # The line comes where the thinking was cut: streamed plainly, inside its block.
    cut = "thinking cut at 4 tokens (think_budget)"
    assert f"<think>\n{thought_text}\n{cut}\n</think>\nParis.\n" in out
    assert h.last_stats is not None and h.last_stats.generated_tokens == 1 + 4 + 3 + len(answer)


def test_thinking_within_the_budget_is_left_alone(h, thinker, script):
    tok = thinker[1]
    h.run("/set think_budget 50")
    gen = thought(tok, "I should greet.", "Hello there!")
    script([*gen, end(tok)])
    out = h.run("hi")
    assert h.chat.history()[-1].token_ids == tuple(gen)
    assert "thinking cut" not in out


@pytest.mark.parametrize("off", ["0", "none"])
def test_a_budget_of_0_or_none_is_no_budget(h, thinker, script, off):
    tok = thinker[1]
    h.run("/set think_budget 2")
    assert h.run(f"/set think_budget {off}") == f"think_budget = {off} for this session\n"
    gen = thought(tok, "I should greet the user warmly.", "Hello there!")
    script([*gen, end(tok)])
    assert "thinking cut" not in h.run("hi")
    assert h.chat.history()[-1].token_ids == tuple(gen)


def test_a_bad_budget_is_one_line(h):
    out = h.run("/set think_budget -3")
    assert out.startswith("error: think_budget must be between 0 and 1000000, not -3")
    assert out.count("\n") == 1 and h.chat.settings.think_budget is None


def test_the_budget_is_a_flag_a_variable_and_a_config_key(tmp_path, monkeypatch):
    from kvrepl.app.args import flag_settings, parse
    from kvrepl.config import load_settings

    assert load_settings(flag_settings(parse(["--think-budget", "64"]))).think_budget == 64
    monkeypatch.setenv("KVREPL_THINK_BUDGET", "32")
    assert load_settings(flag_settings(parse([]))).think_budget == 32


def opening(template: str = THINKING) -> Any:
    """The thinking tokenizer with a template whose answer opens inside `<think>` (as
    DeepSeek-R1's and Qwen3-Thinking-2507's do): every token is thinking until the close."""
    tok = make_thinking_tokenizer()
    tok.chat_template = template.replace(
        "{{ '<|im_start|>assistant\n' }}{% if enable_thinking",
        "{{ '<|im_start|>assistant\n<think>\n' }}{% if enable_thinking",
    )
    assert tok.chat_template != template
    return tok


def test_the_budget_counts_from_a_think_the_prompt_opens(tmp_path, script):
    tok = opening()
    h = make_harness(tmp_path / "store", tiny_loaded((make_tiny_model(len(tok)), tok)),
                     settings=dataclasses.replace(SETTINGS, think_budget=3))  # fmt: skip
    try:
        thinking, answer = enc(tok, "one two three four five")[:3], enc(tok, "Fine.")
        script([*thinking, *answer, end(tok)])
        out = h.run("hi")
        stored = h.chat.history()[-1]
        assert stored.token_ids == (*thinking, *close(h), *answer)
        assert (stored.content, stored.think) == ("Fine.", tok.decode(thinking))
        assert "thinking cut at 3 tokens (think_budget)" in out
    finally:
        h.close()


def test_reuse_equals_no_reuse_after_a_budgeted_turn(tmp_path):
    """Greedy on an untied tiny model (varied tokens): the budget cuts the first answer, and
    every answer after it is the same, as ids, reusing the cache or recomputing each turn."""
    tok = opening()
    loaded = tiny_loaded((make_tiny_model(len(tok), tied=False), tok))
    settings = Settings(temperature=0.0, repetition_penalty=1.0, max_tokens=12, think_budget=4)
    sides = {}
    for reuse in (True, False):
        h = make_harness(tmp_path / str(reuse), loaded,
                         settings=dataclasses.replace(settings, reuse=reuse))  # fmt: skip
        try:
            outs = [h.run(text) for text in ("hi", "how are you?", "bye")]
            answers = [m for m in h.chat.history() if m.role == "assistant"]
            sides[reuse] = ([m.token_ids for m in answers], [h.last_stats.reused_tokens], outs)
        finally:
            h.close()
    assert sides[True][0] == sides[False][0]
    first = sides[True][0][0]
    assert first[4 : 4 + 3] == tuple(close_ids(Prompt(tok)))  # cut after 4 tokens of thinking
    assert "thinking cut at 4 tokens" in sides[True][2][0]
    assert sides[True][1][0] > 0 and sides[False][1][0] == 0  # reuse happened on one side only


# ---------------------------------------------------------------------------------------------
# the think budget on the real model's fast path: the close is three text tokens there

# The embedded model's ChatML, its answer opened inside `<think>` (which its vocabulary spells
# in pieces: `</think>` is '</', 'think', '>'), earlier answers rendered without their thinking.
OPENS_IN_THINK = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + message['content'].split('</think>')[-1].lstrip('\n')"
    " + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
PASSAGE = "The quick brown fox jumps over the lazy dog near the river bank at dawn."


@pytest.fixture(scope="module")
def real_thinker(real) -> Any:
    """The embedded model (fast path) with OPENS_IN_THINK on a copy of its tokenizer."""
    tok = copy.deepcopy(real.tokenizer)
    tok.chat_template = OPENS_IN_THINK
    return dataclasses.replace(real, tokenizer=tok)


def test_real_reuse_equals_no_reuse_bit_for_bit_after_a_budgeted_turn(real_thinker, tmp_path):
    """The forced close is fed like sampled tokens: the reusing side's cache equals a
    recomputation of its ids from nothing (K and V of every layer, bit for bit), and every
    answer equals the --no-reuse side's (which drafts nothing), as ids."""
    budget = 8
    settings = Settings(temperature=0.0, repetition_penalty=1.0, max_tokens=24,
                        think_budget=budget)  # fmt: skip
    texts = (f"Repeat this sentence: {PASSAGE}", "Now say it backwards.")
    sides = {}
    for reuse in (True, False):
        side = dataclasses.replace(settings, reuse=reuse, draft=reuse)
        h = make_harness(tmp_path / str(reuse), real_thinker, settings=side)
        try:
            outs = [h.run(text) for text in texts]
            answers = [m.token_ids for m in h.chat.history() if m.role == "assistant"]
            sides[reuse] = (answers, outs, h.last_stats)
            if reuse:
                _, layers = recompute(real_thinker, list(h.rt.engine.pc.ids))
                assert_bitwise("after a budgeted turn", h.rt.engine.pc.export(), layers)
        finally:
            h.close()
    assert sides[True][0] == sides[False][0]
    close = close_ids(Prompt(real_thinker.tokenizer))
    assert len(close) > 1  # a text close: its tag in pieces
    for answer, out in zip(sides[True][0], sides[True][1], strict=True):
        assert answer[budget : budget + len(close)] == tuple(close)
        assert f"thinking cut at {budget} tokens (think_budget)" in out
    assert sides[True][2].reused_tokens > 0 and sides[False][2].reused_tokens == 0


def test_drafting_never_drafts_across_the_forced_close(real_thinker, script, monkeypatch):
    """The answer copies the prompt's passage (scripted), so that drafts of the rest of it are
    proposed at every step: none reaches past the budget, where the close is forced."""
    from kvrepl.engine import engine as engine_module

    tok = real_thinker.tokenizer
    prompt = Prompt(tok)
    ids = prompt.render([{"role": "user", "content": f"Repeat this: {PASSAGE}"}])
    passage = enc(tok, " " + PASSAGE)
    limit = 9
    ends = prompt.end_token_ids()
    script([*passage[:limit], min(ends)])
    budget = ThinkBudget(limit, close_ids(prompt), in_think=True)
    reached: list[int] = []  # where each draft proposed while thinking would end

    class Watched(engine_module.Drafter):
        def propose(self, context: Any, token: int, most: int) -> list[int]:
            guess = super().propose(context, token, most)
            if budget.room() is not None:
                reached.append(budget.thought + len(guess))
            return guess

    monkeypatch.setattr(engine_module, "Drafter", Watched)
    e = Engine(real_thinker.model, tok, end_ids=ends, context_length=real_thinker.context_length)
    list(e.stream(ids, Sampling(temperature=0, max_tokens=40, draft=True), steer=budget))
    assert e.progress.generated == [*passage[:limit], *close_ids(prompt)]
    assert e.progress.drafted > 0 and max(reached) <= limit  # none past the close
    assert e.progress.accepted == e.progress.drafted


def test_the_close_is_forced_on_a_backend_that_feeds_ahead(tmp_path):
    """The GPU path's decoder (its torch backend, on the CPU) feeds each sampled token from the
    device before the host reads it: the forced close still comes after exactly N tokens of
    thinking, and the answer is the same as feeding after reading."""
    from kvrepl.backends.gpu.model import GpuModel

    tok = opening()
    model = GpuModel(make_tiny_model(len(tok), seed=1, tied=False), 512, backend="torch")
    prompt = Prompt(tok)
    ids = prompt.render([{"role": "user", "content": "hi"}])
    close = close_ids(prompt)
    got = {}
    for ahead in (True, False):
        e = Engine(model, tok, end_ids=set(), context_length=512)
        assert e.runner.ahead is True
        e.runner.ahead = ahead
        budget = ThinkBudget(5, close, in_think=prompt.opens_in_think(ids))
        list(e.stream(ids, Sampling(temperature=0, max_tokens=14), steer=budget))
        got[ahead] = list(e.progress.generated)
        assert e.pc.ids == [*ids, *got[ahead]]  # the cache holds what was generated, no more
    assert got[True] == got[False] and got[True][5 : 5 + len(close)] == close
    assert len(got[True]) == 14
