"""Prompt-lookup drafting's parts alone: the lookup finds the latest longest match, the policy
drafts only where the measured rates and row cost say it pays, the setting and the runner decide
whether a turn drafts, and the stats line and JSON say what was drafted (the engine's drafting
against token-by-token decoding is test_draft.py's)."""

from __future__ import annotations

import numpy as np
import pytest

from kvrepl.app.turnlines import TurnResult, format_stats, turn_object
from kvrepl.config import Settings
from kvrepl.engine.draft import MAX_NGRAM, Drafter, Lookup, Recase
from kvrepl.engine.engine import Engine, Sampling
from kvrepl.engine.policy import (
    ANSWER,
    BEFORE,
    LENGTHS,
    MARGIN,
    MAX_DRAFT,
    PRIOR_COST,
    DraftPolicy,
)
from kvrepl.events import Stats

# ---------------------------------------------------------------------------------------------
# the lookup and the policy alone


def test_the_lookup_finds_the_longest_latest_match_and_what_followed():
    ctx = [5, 1, 2, 3, 9, 8, 4, 2, 3, 10, 11, 1, 2]
    lk = Lookup(ctx)
    # the tail "1 2" and the token 3: "1 2 3" at the start beats the later "2 3"
    assert lk.continuation(3, 4) == (3, [9, 8, 4, 2])
    ctx += [3, 7, 2]
    lk.sync(ctx)
    # "7 2 3" occurs nowhere; "2 3" three times: the latest, and up to the token itself
    assert lk.continuation(3, 5) == (2, [7, 2, 3])
    assert lk.continuation(99, 3) == (0, [])
    assert lk.continuation(11, 10) == (1, [1, 2, 3, 7, 2, 11])


def _longest_by_hand(a: list[int], end: int) -> tuple[int, int]:
    """The longest match (up to MAX_NGRAM) of a[:end]'s tail ending before end - 1, the latest
    of that length, by trying every place: the reference for draft._longest."""
    best = (0, -1)
    for p in range(end - 1):
        n = 0
        while n < MAX_NGRAM and p - n >= 0 and a[p - n] == a[end - 1 - n]:
            n += 1
        if n and n >= best[0]:
            best = (n, p)
    return best


def test_the_lookup_measures_long_matches_as_trying_every_place_would():
    """Matches of every length up to MAX_NGRAM (a copy under way is one), among few symbols so
    that many places tie and overlap: the one-candidate shortcut must extend exactly as far."""
    from kvrepl.engine.draft import _longest

    rng = np.random.default_rng(7)
    copy = list(rng.integers(0, 50, 3 * MAX_NGRAM))
    cases = [copy + [99] + copy, copy + copy[: MAX_NGRAM // 2], [0] * 60, [0, 1] * 40]
    cases += [list(rng.integers(0, int(rng.integers(2, 5)), int(rng.integers(2, 90))))
              for _ in range(300)]  # fmt: skip
    for a in cases:
        arr = np.array(a + [0], dtype=np.int64)
        for end in range(1, len(a) + 1):
            assert _longest(arr, end) == _longest_by_hand(a, end), (a, end)
    assert _longest(np.array(cases[0]), len(cases[0]))[0] == MAX_NGRAM  # a copy past the cap


def test_the_lookups_matches_as_context_grows_are_those_of_trying_every_place():
    """Lookup matches from each token's places (a loop over ints), or numpy's way where a token
    occurs more than _MANY times: both must find what trying every place finds, token after
    token as the context grows."""
    from kvrepl.engine.draft import _MANY

    rng = np.random.default_rng(11)
    for trial in range(60):
        symbols = int(rng.integers(2, 6))
        ctx = [int(t) for t in rng.integers(0, symbols, int(rng.integers(1, 40)))]
        if trial % 10 == 0:  # one token past _MANY places
            ctx = [0, 1] * (_MANY + 5) + ctx
        lookup = Lookup(tuple(ctx) if trial % 2 else np.array(ctx))  # as the engine's ids come
        for _ in range(40):
            token, limit = rng.integers(0, symbols + 1), int(rng.integers(0, 20))  # numpy's int
            a = ctx + [token]
            n, at = _longest_by_hand(a, len(a))
            want = (0, []) if n == 0 or limit <= 0 else (n, a[at + 1 : at + 1 + limit])
            assert lookup.continuation(token, limit) == want, (ctx, token, limit)
            ctx.append(int(token) if rng.random() < 0.7 else int(rng.integers(0, symbols)))
            lookup.sync(tuple(ctx) if trial % 2 else np.array(ctx))


def test_a_long_record_of_accepted_drafts_is_not_undone_by_one_rejection():
    """Rates are counts that fade over MEMORY outcomes (64), not a running average that one
    miss moves by a tenth: a copy that has been taken 40 times stays worth drafting far."""
    policy = DraftPolicy()
    policy.cost = [0.25] * MAX_DRAFT
    policy.timings = [1] * MAX_DRAFT
    i = LENGTHS - 1
    for _ in range(40):
        policy.observed(LENGTHS, 1, 1)
    rate = policy.rate[BEFORE]
    high = rate[i]
    policy.observed(LENGTHS, 1, 0)
    assert high > 0.97 and high - rate[i] < 0.05, (high, rate[i])  # EMA: 0.10
    # a running average (a tenth a miss) drafts 6 here: the rate ~0.9 prices the tail out
    assert policy.size(LENGTHS, MAX_DRAFT) >= 9


def test_drafts_stop_before_an_end_token_and_outcomes_move_the_policy():
    policy = DraftPolicy()
    policy.cost = [0.0] * MAX_DRAFT
    ctx = [1, 2, 3, 4, 5, 6, 7, 99, 8, 9]
    drafter = Drafter(ctx, policy, end_ids={99})
    assert drafter.propose(ctx, 2, 4) == [3, 4, 5, 6]  # the limit
    before = list(policy.rate[BEFORE])
    ctx += [2, 3, 4, 5, 6]  # all accepted, then the next token
    assert drafter.propose(ctx, 7, 10) == []  # what followed 7 is the end token
    # each drafted token was told to the rate of the match it extended: lengths 1 to 4
    assert all(policy.rate[BEFORE][i] > before[i] for i in range(4)), (before, policy.rate)
    assert policy.rate[BEFORE][4:] == before[4:]
    ctx += [7]
    assert drafter.propose(ctx, 8, 10)[:2] == [9, 2]  # 8 was seen once: a match of 1
    ctx += [8]
    before = list(policy.rate[BEFORE])
    drafter.propose(ctx, 5, 10)  # the answer took 5, not 9: rejected at the first token
    assert policy.rate[BEFORE][0] < before[0] and policy.rate[BEFORE][1:] == before[1:]


def test_the_policy_drafts_nothing_where_it_would_not_pay():
    policy = DraftPolicy()
    policy.cost = [0.6] * MAX_DRAFT
    policy.rate[BEFORE] = [0.3, 0.5, 0.55] + [0.95] * (LENGTHS - 3)
    assert [policy.size(m, MAX_DRAFT) for m in (1, 2, 3)] == [0, 0, 0]
    assert policy.size(4, MAX_DRAFT) >= 2
    policy.cost = [0.1] * MAX_DRAFT
    assert policy.size(4, MAX_DRAFT) > 6 and policy.size(1, MAX_DRAFT) >= 1
    for _ in range(3):
        policy.timed(1, 0.010)
    for _ in range(30):
        policy.timed(9, 0.030)  # 8 more rows cost 2 steps: a row a quarter of a step
    assert 0.2 < policy.cost[7] < 0.3
    assert policy.cost[:7] + policy.cost[8:] == [0.1] * (MAX_DRAFT - 1)  # the other sizes'


def test_a_draft_size_that_costs_more_a_row_is_not_chosen():
    """One drafted token verified in a 2-row forward may cost more a row than eight do: the
    policy weighs each size by its own measured cost."""
    policy = DraftPolicy()
    policy.rate[BEFORE] = [0.8] * LENGTHS
    policy.cost = [0.5] * MAX_DRAFT
    assert policy.size(1, 1) == 1  # (1 + 0.8) / (1 + 0.5) = 1.2: pays
    policy.timed(1, 0.010)
    for _ in range(60):
        policy.timed(2, 0.0185)  # the 2-row forward: 0.85 of a step for its drafted row
    assert 0.8 < policy.cost[0] < 0.9
    assert policy.size(1, 1) == 0  # (1 + 0.8) / (1 + 0.85) < 1 + MARGIN


def test_a_count_never_timed_is_priced_as_the_largest_timed_below_it_and_tried():
    """Counts past the ones timed are not left at the prior: a long copy that has only been
    drafted 5 tokens at a time tries 16 (the prior's 0.5 a row would have kept it at 5), and
    what that forward costs is then its own."""
    policy = DraftPolicy()
    policy.rate[BEFORE] = [0.99] * LENGTHS
    policy.timed(1, 0.010)
    for _ in range(40):
        policy.timed(6, 0.0195)  # 5 drafted: 0.19 of a step a row
    assert policy.timings[4] and not any(policy.timings[5:])
    priced = policy.priced()
    assert priced[:4] == [0.5] * 4  # below every timed count: the prior
    assert priced[5:] == [policy.cost[4]] * (MAX_DRAFT - 5)
    assert policy.cost[5:] == [0.5] * (MAX_DRAFT - 5)  # the measures themselves untouched
    assert policy.size(LENGTHS, MAX_DRAFT) == MAX_DRAFT
    policy.timed(12, 0.010 * (1 + 0.3 * 11))  # once: its cost is that timing, not the prior's
    assert abs(policy.cost[10] - 0.3) < 1e-9 and policy.priced()[11] == policy.cost[10]
    for _ in range(40):
        policy.timed(MAX_DRAFT + 1, 0.010 * (1 + 0.9 * MAX_DRAFT))  # 16 rows cost 0.9 each
    assert policy.priced()[MAX_DRAFT - 1] > 0.8
    assert policy.size(LENGTHS, MAX_DRAFT) < MAX_DRAFT


def test_one_slow_forward_does_not_stop_drafting_for_the_session():
    """A first timing of one drafted token that came out slow (another process had the core)
    prices every count out: untimed counts take the cost of the timed one below. Proposals not
    drafted pull the cost back toward the prior, so a long copy drafts again, and a cost that
    was measured low is not raised by it."""
    policy = DraftPolicy()
    policy.rate[BEFORE] = [0.95] * LENGTHS
    policy.timed(1, 0.010)
    policy.timed(2, 0.010 * (1 + 3.0))  # 3 steps for one drafted row: capped at 2
    assert policy.cost[0] == 2.0 and policy.size(LENGTHS, MAX_DRAFT) == 0
    tries = next((i for i in range(1000) if policy.size(LENGTHS, MAX_DRAFT)), None)
    assert tries is not None and 50 < tries < 300
    assert PRIOR_COST < policy.cost[0] < 0.8  # drafting pays again at about this cost
    low = DraftPolicy()
    low.rate[BEFORE] = [0.0] * LENGTHS  # never pays: every proposal is undrafted
    low.timed(1, 0.010)
    low.timed(2, 0.010 * 1.2)
    for _ in range(500):
        assert low.size(LENGTHS, MAX_DRAFT) == 0
    assert abs(low.cost[0] - 0.2) < 1e-9 and low.cost[1:] == [PRIOR_COST] * (MAX_DRAFT - 1)


def test_a_match_in_the_prompt_and_one_in_the_answer_are_rated_apart():
    """Prose that repeats its own phrases, drafts rejected, does not stop a copy of the prompt
    from drafting (nor a copy's record make the prose draft): each proposal is told to the
    rates of where its match lies, before the answer or in it."""
    policy = DraftPolicy()
    policy.cost = [0.2] * MAX_DRAFT
    policy.timings = [1] * MAX_DRAFT
    prompt = [10, 11, 12, 13, 14, 15, 16, 17]
    drafter = Drafter(prompt, policy, end_ids=set())
    ctx = [*prompt, 20, 21, 22, 23, 20, 21]  # the answer so far: "20 21" twice
    assert drafter.propose(ctx, 22, 4)  # its own "20 21 22": drafted (the prior pays)
    assert drafter._last[3] == ANSWER
    before = list(policy.rate[BEFORE])
    for i in range(30):  # the answer never goes on as it did before (23, 100, 101, ...)
        ctx += [22, 100 + i, 20, 21]
        drafter.propose(ctx, 22, 4)
    assert policy.rate[ANSWER][2] < 0.3 and policy.rate[BEFORE] == before
    assert drafter.propose(ctx, 22, 4) == []  # its own phrase: no longer drafted
    ctx += [22, 99, 12]
    assert policy.size(3, 4, ANSWER) == 0 and policy.size(3, 4, BEFORE) >= 1
    k = policy.size(2, 4, BEFORE)  # the prompt's "12 13": drafted as the prior says
    assert k >= 1
    assert drafter.propose(ctx, 13, 4) == [14, 15, 16, 17][:k]
    assert drafter._last[3] == BEFORE


def test_a_pinned_policy_keeps_its_rates_and_costs_whatever_comes():
    pinned, free = DraftPolicy(), DraftPolicy()
    for policy in (pinned, free):
        policy.pin(rate=0.95, cost=0.0)
    free.pinned = False
    for policy in (pinned, free):
        policy.timed(1, 0.01)
        policy.timed(9, 0.05)  # a slow row: 0.5 of a step
        for _ in range(40):
            policy.observed(1, 4, 0)  # every draft rejected
    assert pinned.rate == [[0.95] * LENGTHS] * 2 and pinned.cost == [0.0] * MAX_DRAFT
    assert pinned.size(1, MAX_DRAFT) == MAX_DRAFT
    high = DraftPolicy()
    high.pin(rate=0.3, cost=0.8)  # never pays: every proposal undrafted, the cost still held
    for _ in range(200):
        assert high.size(1, MAX_DRAFT) == 0
    assert high.cost == [0.8] * MAX_DRAFT
    assert free.rate[BEFORE][0] < 0.2 and free.cost[7] > 0.4  # (what the pin holds off)


def test_a_long_match_drafts_further_than_a_fresh_one():
    """The tokens of a draft extend its match: a copy under way drafts far, a match of one
    token drafts little or nothing; and a gain under MARGIN drafts nothing."""
    policy = DraftPolicy()
    policy.cost = [0.45] * MAX_DRAFT
    policy.rate[BEFORE] = [0.4, 0.6, 0.75, 0.85, 0.9, 0.93] + [0.98] * (LENGTHS - 6)
    fresh, long = policy.size(1, MAX_DRAFT), policy.size(LENGTHS, MAX_DRAFT)
    assert fresh <= 1 and long >= 8, (fresh, long)
    policy.cost = [0.5] * MAX_DRAFT
    policy.rate[BEFORE][0] = 0.5 + 0.5 * MARGIN  # gains MARGIN / 3
    assert policy.size(1, 1) == 0
    policy.rate[BEFORE][0] = 0.5 + 2 * MARGIN  # 4 MARGIN / 3
    assert policy.size(1, 1) == 1


# ---------------------------------------------------------------------------------------------
# where drafting is on, and what the turn says of it


def test_the_setting_and_the_runner_decide_whether_it_drafts(tiny):
    assert Sampling.from_settings(Settings(draft=False)).draft is False
    assert Sampling().draft is True
    model, tok = tiny  # transformers: its forward gives the last row only, so no drafts
    engine = Engine(model, tok, end_ids=set(), context_length=512)
    assert not engine.runner.drafts
    ids = tok("The capital of France is Paris. The capital of", add_special_tokens=False).input_ids
    list(engine.stream(ids, Sampling(temperature=0, max_tokens=8)))
    assert engine.progress.drafted == 0 and len(engine.progress.generated) == 8


def test_the_stats_line_and_json_show_drafts_only_when_there_were_some():
    plain = Stats(10, 5, 40, 0.2, 30.0)
    drafted = Stats(10, 5, 40, 0.2, 30.0, drafted_tokens=36, accepted_tokens=30)
    assert "drafted" not in format_stats(plain)
    assert format_stats(drafted).endswith("30.0 tok/s · drafted 36 (30 accepted)")
    assert list(drafted.as_dict()) == list(plain.as_dict()) == [
        "reused_tokens", "prefilled_tokens", "generated_tokens", "ttft_s", "decode_tok_s"
    ]  # fmt: skip
    objs = [turn_object(TurnResult("a", "", s, "stop", False), {}, think=False)
            for s in (plain, drafted)]  # fmt: skip
    assert objs[0]["stats"] == plain.as_dict()
    assert objs[1]["stats"] == {**plain.as_dict(), "drafted_tokens": 36, "accepted_tokens": 30}


# ---------------------------------------------------------------------------------------------
# a copy the answer recases (the embedded model's tokenizer: byte-level BPE)


@pytest.mark.model
def test_recase_folds_names_and_applies_a_change_of_first_letter(real):
    tok = real.tokenizer
    rc = Recase(tok)
    apples, capital, c, hed = tok.encode(" apples Apples cheddar", add_special_tokens=False)[:4]
    assert rc.fold(capital) == rc.fold(apples) == apples and rc.fold(hed) == hed
    assert rc.change(apples, capital) == "upper" and rc.change(capital, apples) == "lower"
    assert rc.change(apples, hed) is None
    dash = tok.encode("-", add_special_tokens=False)[0]
    assert tok.decode(rc.apply(c, dash, "upper")) == " C"  # " cheddar" is " c" "hed" "dar"
    assert rc.apply(hed, c, "upper") == [hed]  # inside a word: as it is
    past = len(tok) + 5  # a padded vocabulary's row past the tokenizer's tokens: no string
    assert rc.fold(past) == past and rc.change(past, apples) is None
    (line,) = tok.encode("\n", add_special_tokens=False)
    (word,) = tok.encode("bread", add_special_tokens=False)  # a line's first word: no space
    assert tok.decode(rc.apply(word, line, "upper")) == "Bread"


@pytest.mark.model
def test_a_capitalised_copy_is_drafted_capitalised(real):
    tok = real.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    source = enc("List:\n- apples\n- bread\n- olive oil\n- rice\nAgain:\n- Apples\n- Bread\n-")
    ctx, token = source[:-1], source[-1]
    lk = Lookup(ctx, Recase(tok))
    exact, _ = lk.continuation(token, 16)
    length, guess = lk.recased(token, 16, exact)
    assert length > exact
    assert tok.decode(guess).startswith(" Olive Oil\n- Rice\nAgain")
    assert Lookup(ctx).recased(token, 16, exact) == (0, [])  # no Recase: no such match
    # drafted from the prompt's list: its rates are the prompt's (BEFORE), even where the exact
    # lookup's shorter match lies in the answer ("- A" after "Again:\n")
    prompt = enc("List:\n- apples\n- bread\n- olive oil\n- rice\nAgain:\n")
    policy = DraftPolicy()
    policy.pin(rate=0.95, cost=0.0)
    drafter = Drafter(prompt, policy, end_ids=set(), recase=Recase(tok))
    assert tok.decode(drafter.propose(ctx, token, 4)).startswith(" Olive")
    assert drafter.recased == 1 and drafter._last[3] == BEFORE
    # a match that recases two ways (one word up, one down) is no one change: no draft
    mixed = enc("- Apples\n- bread\n- rice\nAgain:\n- apples\n- Bread\n-")
    lk = Lookup(mixed[:-1], Recase(tok))
    assert lk.recased(mixed[-1], 16, lk.continuation(mixed[-1], 16)[0]) == (0, [])
    same = enc("- Apples\n- bread\n- rice\nAgain:\n- apples\n- bread\n-")  # one way: drafts
    lk = Lookup(same[:-1], Recase(tok))
    assert tok.decode(lk.recased(same[-1], 16, lk.continuation(same[-1], 16)[0])[1]).startswith(
        " rice"
    )  # lowered: "rice" was already lower, and stays so
