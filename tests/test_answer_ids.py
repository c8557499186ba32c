"""An answer keeps the ids it was generated as (issue 10, part 1): they are stored with it and
rendered where they spell its content, so the next turn recomputes none of its tokens. A message
without ids, or whose ids do not spell its content, is tokenized from its text as before; and
`--no-reuse` renders the same ids, so greedy reuse still equals recompute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fault_helpers import (
    assert_cache_true,
    assert_last_answer_is_recompute,
    assert_snapshot_clean,
    fault_harness,
    make_fault_model,
    make_loaded,
)
from helpers import close_conversation, open_conversation
from makers import make_thinking_tokenizer

from kvrepl.chat.conversation import Conversation
from kvrepl.chat.prompt import Prompt
from kvrepl.config import Settings
from kvrepl.events import Notice, Stats, TextDelta
from kvrepl.ids import common_prefix

ANSWER = "The capital of France is Paris."


def by_char(tok: Any, text: str) -> list[int]:
    """`text` as one token per character: ids that decode to it but that tokenizing it never
    gives (the kind of ids a model generates and a re-tokenization merges)."""
    ids = [tok(c, add_special_tokens=False).input_ids for c in text]
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert flat != tok(text, add_special_tokens=False).input_ids
    return flat


def end(tok: Any) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------------------------
# Prompt: which ids an answer contributes


def test_an_answer_is_rendered_as_its_own_ids_after_its_prompt(tiny):
    tok = tiny[1]
    prompt = Prompt(tok)
    own = by_char(tok, ANSWER)
    q = {"role": "user", "content": "Hello there, how are you?"}
    msgs = [
        q,
        {"role": "assistant", "content": ANSWER, "ids": own},
        {"role": "user", "content": "x"},
    ]
    asked = prompt.render([q])  # the prompt the answer was generated after
    ids, starts = prompt.render_with_offsets(msgs)
    assert ids[: len(asked) + len(own)] == asked + own
    assert starts[1] == len(asked)
    # The text is the same as the template's: only its tokenization is the model's own.
    assert tok.decode(ids) == prompt.render_text(msgs)
    without = [msgs[0], {"role": "assistant", "content": ANSWER}, msgs[2]]
    assert prompt.render(without) != ids
    assert tok.decode(prompt.render(without)) == tok.decode(ids)


@pytest.mark.parametrize(
    "case", ["other text", "a control token", "out of the vocabulary", "thinking", "empty"]
)
def test_ids_that_do_not_spell_the_content_fall_back_to_its_text(tiny, case):
    tok = tiny[1]
    prompt = Prompt(tok)
    content = ANSWER
    own = by_char(tok, ANSWER)
    if case == "other text":
        own = by_char(tok, "The capital of France is Lyon.")
    elif case == "a control token":  # decodes to the content, but message text never holds one
        content = ANSWER + "<|im_end|>"
        own = [*own, end(tok)]
    elif case == "out of the vocabulary":
        own = [*own, len(tok) + 5]
    elif case == "thinking":  # the splitter stored the answer alone: the ids hold more
        own = tok("<think>hmm</think>\n\n", add_special_tokens=False).input_ids + own
    elif case == "empty":
        content, own = "", []
    q = {"role": "user", "content": "Hello there"}
    with_ids = [q, {"role": "assistant", "content": content, "ids": own}]
    plain = [q, {"role": "assistant", "content": content}]
    for gen in (True, False):
        assert prompt.render_with_offsets(with_ids, add_generation_prompt=gen) == (
            prompt.render_with_offsets(plain, add_generation_prompt=gen)
        )


def test_an_added_token_that_is_only_vocabulary_may_stay_a_structural_one_may_not():
    """Some vocabularies add tokens that are plain vocabulary (Gemma's HTML tags and runs of
    whitespace): an answer the model wrote with one keeps it. An added token the template
    spells (`</think>` in a thinking template) is structure: never taken from an answer's ids."""
    tok = make_thinking_tokenizer()
    tok.add_tokens(["<table>"])
    prompt = Prompt(tok)
    table, close = tok.convert_tokens_to_ids("<table>"), tok.convert_tokens_to_ids("</think>")
    q = {"role": "user", "content": "Hello there"}
    for marker, used in ((table, True), (close, False)):
        own = [*by_char(tok, "Paris "), marker, *by_char(tok, " there")]
        content = tok.decode(own)
        msgs = [q, {"role": "assistant", "content": content, "ids": own}]
        ids, starts = prompt.render_with_offsets(msgs, add_generation_prompt=False)
        assert (ids[starts[1] : starts[1] + len(own)] == own) is used, tok.decode([marker])
        assert tok.decode(ids).endswith(f"assistant\n{content}<|im_end|>\n")


# ---------------------------------------------------------------------------------------------
# Conversation: stored with the answer, reused on the next turn


@pytest.fixture
def chat_over(tmp_path: Path):
    opened: list[Conversation] = []

    def open_chat(loaded: Any, **over: Any) -> Conversation:
        settings = Settings(**{"temperature": 0.0, "max_tokens": 64, **over})
        chat = open_conversation(loaded, tmp_path / "store", settings)
        opened.append(chat)
        return chat

    yield open_chat
    for chat in opened:
        close_conversation(chat)


def turn(chat: Conversation, text: str) -> tuple[Stats, list[str], str]:
    sent = chat.send(text)
    events = list(sent)
    stats = sent.result.stats
    assert stats is not None
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    return stats, [e.text for e in events if isinstance(e, Notice)], answer


def test_the_next_turn_recomputes_none_of_the_answer(tiny, chat_over, script):
    model, tok = tiny
    chat = chat_over(make_loaded(model, tok), max_tokens=40)
    own = by_char(tok, ANSWER)
    long = by_char(tok, "Hello there, how are you? The capital of France is Paris.")
    script([*own, end(tok)], long, [end(tok)])
    _, _, answer = turn(chat, "What is the capital of France?")
    assert answer == ANSWER
    stored = chat.history()[-1]
    assert stored.token_ids == tuple(own)  # the end token is not the answer's: the template's
    cached = len(chat.model.get().engine.pc.ids)

    stats, notices, _ = turn(chat, "And of Italy?")
    assert stats.reused_tokens == cached  # every answer token
    assert not [n for n in notices if n.startswith("cache:")]
    # An answer cut by max_tokens keeps its ids too, and the one after is reused whole again.
    assert chat.history()[-1].token_ids == tuple(long[:40])
    cached = len(chat.model.get().engine.pc.ids)
    stats, _, _ = turn(chat, "Thanks")
    assert stats.reused_tokens == cached
    assert_cache_true(chat.model.get().engine)


def test_an_interrupted_answer_keeps_exactly_what_was_generated(tiny, chat_over, script):
    model, tok = tiny
    chat = chat_over(make_loaded(model, tok))
    own = by_char(tok, ANSWER)
    script([*own, end(tok)], [end(tok)])
    events = chat.send("What is the capital of France?")
    deltas = 0
    for event in events:
        deltas += isinstance(event, TextDelta)
        if deltas == 10:
            break
    events.close()  # the consumer stops the turn: the answer is stored, interrupted
    answer = chat.history()[-1]
    assert answer.interrupted and answer.content == ANSWER[:10]
    generated = chat.model.get().engine.progress.generated
    assert answer.token_ids == tuple(generated) == tuple(own[:10])
    cached = len(chat.model.get().engine.pc.ids)  # the last token was generated, never fed

    stats, _, _ = turn(chat, "Go on")
    assert stats.reused_tokens == cached
    assert_cache_true(chat.model.get().engine)


def test_an_older_answer_without_ids_is_tokenized_from_its_text(tiny, chat_over, script):
    model, tok = tiny
    chat = chat_over(make_loaded(model, tok))
    session = chat.sessions.new_session("old")
    assert session is not None
    chat.store.add_message(session.id, "user", "What is the capital of France?")
    chat.store.add_message(session.id, "assistant", ANSWER)  # as an older kvrepl stored it
    script([end(tok)])
    stats, _, _ = turn(chat, "And of Italy?")
    msgs = [{"role": m.role, "content": m.content} for m in chat.history()[:-1]]
    assert stats.prefilled_tokens == len(chat.model.get().prompt.render(msgs))
    assert "ids" not in chat.prompt_messages()[1]


def test_an_answer_edited_behind_kvrepls_back_is_rendered_from_its_new_text(
    tiny, chat_over, script
):
    """The messages are the truth: ids that no longer spell the stored answer are not used, and
    the cache is cut where the answer changed, with one line saying so."""
    model, tok = tiny
    chat = chat_over(make_loaded(model, tok))
    script([*by_char(tok, ANSWER), end(tok)], [end(tok)])
    turn(chat, "What is the capital of France?")
    cached = list(chat.model.get().engine.pc.ids)
    answer = chat.history()[-1]
    chat.store.db.execute(
        "UPDATE messages SET content = ? WHERE id = ?", [ANSWER.replace("Paris", "Lyon"), answer.id]
    )
    msgs = [{"role": m.role, "content": m.content} for m in chat.history()]
    want = chat.model.get().prompt.render([*msgs, {"role": "user", "content": "Sure?"}])
    stats, notices, _ = turn(chat, "Sure?")
    assert chat.model.get().engine.pc.ids[: len(want)] == want
    keep = common_prefix(cached, want)
    # cut where the answer starts: its new text is tokenized, not spelled by character
    assert stats.reused_tokens == keep == len(chat.model.get().prompt.render(msgs[:1]))
    cuts = [n for n in notices if n.startswith("cache: cut at token")]
    assert cuts == [f"cache: cut at token {keep:,} (turn 1, assistant); recomputing "
                    f"{len(want) - keep:,} tokens"]  # fmt: skip


def test_reuse_equals_recompute_with_answers_as_their_ids(tmp_path, tiny):
    """Greedy answers on a model that writes varied text: each turn's answer, over a cache that
    holds the earlier answers as generated, is token for token the answer of a fresh engine
    that reuses nothing over the stored messages (which render the same ids)."""
    tok = tiny[1]
    loaded = make_loaded(make_fault_model(tok), tok)
    h = fault_harness(tmp_path / "store", loaded, max_tokens=12)
    try:
        for text in ("hello there", "how are you, and what is the capital of France?", "thanks"):
            h.line(text)
            assert_last_answer_is_recompute(h)
            assert_snapshot_clean(h)
        answers = [m for m in h.chat.history() if m.role == "assistant"]
        assert len(answers) == 3 and all(m.token_ids for m in answers)
    finally:
        h.close()


# ---------------------------------------------------------------------------------------------
# the real model: the measurement

REAL_PROMPTS = [
    "List the numbers 1 to 20 separated by commas.",
    "Give me a Markdown list of five tips for writing clean code.",
    "Write a Python function that checks whether a number is prime.",
    "Return a JSON object describing a book with title, author and year.",
    "用中文介绍一下北京。",
]


@pytest.mark.model
def test_real_model_one_turn_answers_are_reused_whole_on_the_next_turn(real, chat_over):
    """Before: the next turn recomputed 67 of the number list's 81 answer tokens and 99 of the
    Markdown list's 115 (their text re-tokenizes into other ids). Now: none, for each."""
    chat = chat_over(real, max_tokens=96)
    recomputed = {}
    for text in REAL_PROMPTS:
        chat.sessions.new_session()
        first, _, answer = turn(chat, text)
        assert answer.strip()
        cached = len(chat.model.get().engine.pc.ids)
        stats, notices, _ = turn(chat, "Thanks!")
        cuts = [n for n in notices if n.startswith("cache:")]
        recomputed[text] = (cached - stats.reused_tokens, first.generated_tokens, cuts)
    assert all(lost == 0 and not cuts for lost, _, cuts in recomputed.values()), recomputed
