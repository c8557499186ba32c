"""Drafting (draft.py; engine._decode/_feed; FastModel.forward(all_logits=True)): tokens guessed
from the conversation are fed together and verified, and the answer, its finish and the cache
(ids, and every layer's K/V bit for bit) are those of token-by-token decoding: greedy and
sampled (the same seed gives the same tokens), on the real embedded model over turns, an edit
and a restored cache, at an end token, the context's end, max_tokens and a closed generator.
A statistical check on a tiny fast model that sampled drafting keeps the distribution (the
lookup, the policy, the setting and the stats line alone: test_draft_policy.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from chisq import critical, two_sample
from helpers import fill_cache
from makers import make_tiny_model, make_tokenizer

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.gguf_model import from_hf
from kvrepl.chat.prompt import Prompt
from kvrepl.engine import engine as engine_module
from kvrepl.engine import models
from kvrepl.engine.engine import Engine, Sampling
from kvrepl.events import Finish, Stats, TextDelta

LIST = ("Here is a shopping list:\n- apples\n- bread\n- milk\n- eggs\n- cheddar cheese\n"
        "- tomatoes\n- olive oil\n- rice\n- chicken breast\n- coffee beans\n\n"
        "Write the same list again, with milk replaced by oat milk.")  # fmt: skip
QUOTE = ("Copy this paragraph exactly, word for word:\n\nThe river rose slowly through the "
         "night, and by morning the lower fields were under water. The farmers moved their "
         "animals to the hill behind the church, where the ground stayed dry, and waited for "
         "the rain to stop.")  # fmt: skip
JSON = ('Here is a JSON object:\n{"name": "Ada Lovelace", "born": 1815, "field": "mathematics", '
        '"known_for": "the first computer program", "city": "London"}\n\n'
        'Write it again with the key "city" renamed to "home".')  # fmt: skip
POEM = "Write a short poem about the sea."


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def smol(real):
    """The real model on the fast path, its Prompt and end ids."""
    prompt = Prompt(real.tokenizer)
    return real, prompt, prompt.end_token_ids(real.model.generation_config)


def make(smol, *, eager: bool = False, context: int | None = None, ends=None) -> Engine:
    """An engine over the real model. `eager`: it drafts whenever the lookup has a match, so
    that drafts are fed, accepted and rejected often (the measured policy is more careful)."""
    real, _, end_ids = smol
    engine = Engine(real.model, real.tokenizer, end_ids=end_ids if ends is None else ends,
                    context_length=context or real.context_length)  # fmt: skip
    if eager:
        # this machine's timings must not price the rows back out (a slow first one replaces
        # the 0.0), nor the outcomes the rates
        engine.draft_policy.pin(rate=0.95, cost=0.0)
    return engine


def render(smol, *users_and_answers: str) -> list[int]:
    roles = ["user", "assistant"]
    msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(users_and_answers)]
    return smol[1].render(msgs)


def turn(engine: Engine, ids: list[int], sampling: Sampling) -> tuple[list[int], str, str]:
    events = list(engine.stream(ids, sampling))
    engine.pc.check()
    assert isinstance(events[-1], Stats) and isinstance(events[-2], Finish)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return list(engine.progress.generated), events[-2].reason, text


def assert_same_cache(a: Engine, b: Engine) -> None:
    """The same ids, and every layer's K and V bit for bit."""
    a.pc.check()
    b.pc.check()
    assert a.pc.ids == b.pc.ids
    for (ka, va), (kb, vb) in zip(a.pc.export(), b.pc.export(), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def both(smol, ids: list[int], sampling: Sampling, **kwargs) -> tuple[Engine, Engine, list]:
    """The same turn with drafting and without, on new engines: the same answer and cache."""
    on, off = make(smol, **kwargs), make(smol, **kwargs)
    got = turn(on, ids, sampling)
    want = turn(off, ids, Sampling(**{**vars(sampling), "draft": False}))
    assert got == want
    assert off.progress.drafted == 0
    assert_same_cache(on, off)
    return on, off, got[0]


# the product's greedy has a repetition penalty, under which this small model rewrites a text
# instead of copying it: the copy prompts run plain greedy
GREEDY = Sampling(temperature=0, max_tokens=120)
PLAIN = Sampling.greedy(120)
OFF = Sampling(temperature=0, repetition_penalty=1.0, max_tokens=120, draft=False)


# ---------------------------------------------------------------------------------------------
# the fast path's rows


@pytest.mark.model
@pytest.mark.parametrize("n", [2, 9, 17])  # the head's pass over 2 and 9 rows and over 17, the
def test_every_rows_logits_equal_a_forward_of_its_prefix(real, n):  # most a draft verifies
    model = real.model
    text = "A quick test of every row's logits, bit for bit, at two, nine and seventeen rows."
    ids = real.tokenizer(text).input_ids
    split = len(ids) - n
    layers = model.new_layers()
    model.forward(ids[:split], layers)
    rows = model.forward(ids[split:], layers, all_logits=True).clone()
    assert rows.shape == (n, model.lm_head.n)
    for i in range(n):
        alone = model.new_layers()
        model.forward(ids[: split + i], alone)
        assert torch.equal(model.forward([ids[split + i]], alone), rows[i]), f"row {i}"
    plain = model.new_layers()
    model.forward(ids[:split], plain)
    assert torch.equal(model.forward(ids[split:], plain), rows[-1])
    for a, b in zip(layers, plain, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


# ---------------------------------------------------------------------------------------------
# greedy: the same answer and cache


@pytest.mark.model
@pytest.mark.parametrize("eager", [False, True], ids=["measured policy", "eager"])
def test_greedy_drafting_equals_token_by_token(smol, eager, monkeypatch):
    drafters = []

    class Kept(engine_module.Drafter):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            drafters.append(self)

    monkeypatch.setattr(engine_module, "Drafter", Kept)
    counts = Counter()
    for user, sampling in [(LIST, PLAIN), (QUOTE, PLAIN), (JSON, GREEDY), (POEM, GREEDY)]:
        on, _, gen = both(smol, render(smol, user), sampling, eager=eager)
        assert len(gen) > 20
        counts["drafted"] += on.progress.drafted
        counts["accepted"] += on.progress.accepted
        if user == QUOTE:
            assert on.progress.accepted > 20  # a copy is drafted and taken
        if user == LIST:  # the model capitalises the list: drafts from the recased copy
            assert on.progress.accepted > 20 and drafters[-1].recased >= 2
    assert counts["accepted"] > 0 and counts["drafted"] > counts["accepted"]  # and rejected


@pytest.mark.model
def test_drafts_from_the_recased_copy_are_taken_and_change_nothing(smol):
    """The model capitalises the list it repeats: the recased copy's drafts are taken, many
    more than the exact copy's, and the answer is token-by-token's either way."""
    accepted = []
    for recase in (True, False):
        on, off = make(smol), make(smol)
        if not recase:
            on.recase = None
        got = turn(on, render(smol, LIST), PLAIN)
        assert got == turn(off, render(smol, LIST), Sampling(**{**vars(PLAIN), "draft": False}))
        assert_same_cache(on, off)
        accepted.append(on.progress.accepted)
    assert accepted[0] > accepted[1] + 10, accepted


@pytest.mark.model
def test_turns_an_edit_and_a_restored_cache_stay_equal(smol):
    on, off = make(smol, eager=True), make(smol, eager=True)
    history: list[str] = []
    for user in (QUOTE, "Now copy it once more.", LIST):
        ids = render(smol, *history, user)
        got = turn(on, ids, PLAIN)
        assert got == turn(off, ids, OFF)
        assert on.progress.reused > 0 or not history
        assert_same_cache(on, off)
        history += [user, got[2]]
    # an edit of the second question: the cache is cut there, and the answers agree again
    edited = render(smol, *history[:2], "Copy only its first sentence.")
    cached = len(on.pc.ids)
    got = turn(on, edited, PLAIN)
    assert 0 < on.progress.reused < cached  # cut where the edit begins
    assert got == turn(off, edited, OFF)
    assert_same_cache(on, off)
    # a resumed session: the cache restored into a new engine, and one more turn
    resumed = make(smol, eager=True)
    fill_cache(resumed.pc, on.pc.ids, on.pc.export())
    ids = render(smol, *history[:2], "Copy only its first sentence.", got[2], "And the second?")
    assert turn(resumed, ids, PLAIN) == turn(off, ids, OFF)
    assert resumed.progress.reused > 0 and resumed.progress.drafted > 0
    assert_same_cache(resumed, off)


@pytest.mark.model
def test_an_end_token_the_draft_would_have_crossed_stops_as_token_by_token(smol):
    """A token of the quoted text made an end token: the drafts stop short of it, and the
    answer ends where it is sampled, mid-copy."""
    real, _, ends = smol
    word = real.tokenizer(" fields", add_special_tokens=False).input_ids
    assert len(word) == 1
    ids = render(smol, QUOTE)
    on, _, gen = both(smol, ids, PLAIN, eager=True, ends=ends | set(word))
    whole = turn(make(smol), ids, PLAIN)[0]
    assert word[0] in whole and len(gen) == whole.index(word[0])  # it stopped there
    assert on.progress.accepted > 5


@pytest.mark.model
@pytest.mark.parametrize("room", [2, 7, 16, 29])
def test_the_context_end_inside_a_draft(smol, room):
    ids = render(smol, QUOTE)
    on, _, gen = both(smol, ids, PLAIN, eager=True, context=len(ids) + room)
    assert len(on.pc.ids) == len(ids) + room - 1  # filled to the last position it may hold
    assert on.progress.drafted > 0 or room <= 2


@pytest.mark.model
@pytest.mark.parametrize("max_tokens", [1, 2, 6, 13, 40])
def test_max_tokens_inside_a_draft(smol, max_tokens):
    ids = render(smol, QUOTE)
    on, _, gen = both(smol, ids, Sampling.greedy(max_tokens), eager=True)
    assert len(gen) == max_tokens
    assert on.progress.drafted > 0 or max_tokens <= 2


@pytest.mark.model
@pytest.mark.parametrize("after", [1, 4, 11, 30])
def test_closing_mid_answer_keeps_what_token_by_token_keeps(smol, after):
    ids = render(smol, QUOTE)
    engines = []
    for draft in (True, False):
        engine = make(smol, eager=True)
        events = engine.stream(ids, PLAIN if draft else OFF)
        deltas = 0
        for event in events:
            deltas += isinstance(event, TextDelta)
            if deltas == after:
                break
        events.close()
        engines.append(engine)
    on, off = engines
    assert on.progress.generated == off.progress.generated
    assert_same_cache(on, off)
    assert on.progress.drafted > 0 or after < 4
    follow = [*ids, *on.progress.generated]  # the next turn goes on from there, equally
    assert turn(on, follow, PLAIN) == turn(off, follow, OFF)
    assert_same_cache(on, off)


@pytest.mark.model
@pytest.mark.parametrize("nth", [1, 3])
def test_ctrl_c_inside_a_verification_keeps_what_token_by_token_keeps(smol, monkeypatch, nth):
    """KeyboardInterrupt in the nth forward of drafts (after the kernels ran: the layers hold
    the drafts' K/V) against one in token-by-token decoding's forward at the same position."""
    real, _, _ = smol
    forward, seen = real.model.forward, {"n": 0, "at": None}

    def interrupted(ids, layers, all_logits=False):
        out = forward(ids, layers, all_logits=all_logits)
        pos = layers[0].get_seq_length() - len(ids)
        if all_logits:
            seen["n"] += 1
            if seen["n"] == nth:
                seen["at"] = pos
                raise KeyboardInterrupt
        elif len(ids) == 1 and pos == seen["at"]:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(real.model, "forward", interrupted)
    ids = render(smol, QUOTE)
    engines = []
    for sampling in (PLAIN, OFF):
        engine = make(smol, eager=True)
        with pytest.raises(KeyboardInterrupt):
            list(engine.stream(ids, sampling))
        engines.append(engine)
    on, off = engines
    assert seen["at"] is not None and on.progress.generated == off.progress.generated
    assert len(on.pc.ids) == seen["at"]  # the interrupted step's token was not fed
    assert_same_cache(on, off)


# ---------------------------------------------------------------------------------------------
# sampled


@pytest.mark.model
def test_sampled_drafting_gives_the_same_tokens_for_the_same_seed(smol):
    accepted = 0
    for seed in range(2):  # the default sampling, and without its penalty (it copies more)
        for user, penalty in ((QUOTE, 1.0), (LIST, 1.0), (JSON, 1.1)):
            s = Sampling(seed=seed, repetition_penalty=penalty, max_tokens=60)
            on, _, _ = both(smol, render(smol, user), s, eager=True)
            accepted += on.progress.accepted
    assert accepted > 30


@pytest.fixture(scope="module")
def tiny_fast():
    """A tiny tied Llama on the fast path whose answers repeat their tokens with a probability
    well between 0 and 1 at temperature 1 (its final norm scaled up), so that drafts of the
    repeats are accepted about three times in four."""
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok), seed=0, tied=True)
    with torch.no_grad():
        hf.model.norm.weight.mul_(12)
    return from_hf(hf, "Q8_0", native.kernels(models.cache_dir()), 512), tok


def first_tokens(tiny_fast, seeds: range, *, draft: bool, temperature: float = 1.0):
    model, tok = tiny_fast
    engine = Engine(model, tok, end_ids=set(), context_length=512)
    # rows free and never timed: this machine's timings (shared, noisy) must not decide whether
    # drafts are made, and the rates stay: drafts on any match
    engine.draft_policy.pin(rate=0.95, cost=0.0)
    ids = tok("The capital of France is Paris. The capital of", add_special_tokens=False).input_ids
    out, drafted, accepted = [], 0, 0
    for seed in seeds:
        s = Sampling(temperature=temperature, top_p=1.0, seed=seed, max_tokens=5, draft=draft)
        list(engine.stream(ids, s))
        out.append(tuple(engine.progress.generated))
        drafted += engine.progress.drafted
        accepted += engine.progress.accepted
    return out, drafted, accepted


def outcomes(answers: list[tuple[int, ...]]) -> tuple[Counter, Counter]:
    """Which of tokens 2..5 repeat the one before (what the drafts guess), and token 3."""
    repeats = Counter(tuple(a[i] == a[i - 1] for i in range(1, 5)) for a in answers)
    return repeats, Counter(a[2] for a in answers)


def test_sampled_drafting_keeps_the_distribution_of_the_first_tokens(tiny_fast):
    n = 700
    on, drafted, accepted = first_tokens(tiny_fast, range(n), draft=True)
    assert 0.3 * drafted < accepted < 0.95 * drafted  # drafts are both accepted and rejected
    off, _, _ = first_tokens(tiny_fast, range(n, 2 * n), draft=False)  # other seeds
    for a, b in zip(outcomes(on), outcomes(off), strict=True):
        stat, df = two_sample(a, b)
        assert stat < critical(df), f"chi-square {stat:.1f} over {df} df"
    # the same seeds without drafting give the same answers, one by one
    assert first_tokens(tiny_fast, range(40), draft=False)[0] == on[:40]
    # and the check has power: a slightly colder sampling is told apart
    colder, _, _ = first_tokens(tiny_fast, range(n, 2 * n), draft=False, temperature=0.8)
    stat, df = two_sample(outcomes(on)[0], outcomes(colder)[0])
    assert stat > critical(df)
