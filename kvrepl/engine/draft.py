"""Prompt-lookup drafting: guesses of the next tokens taken from the conversation itself (the
longest recent match of its last tokens earlier in it, and what followed there, as transformers'
prompt_lookup_num_tokens and llama.cpp's ngram lookup do), and how many of them are worth
verifying.

Owns: the lookup over the context's ids (`Lookup`), and the policy that sizes the drafts
(`DraftPolicy`): an estimate of how often a drafted token is accepted, per length of the match
that proposed it, and of what a verified row costs against a plain step, per number of drafted
tokens, both measured as the engine goes. It never runs the model and never touches the cache:
the engine (engine.py) feeds the drafts, verifies them and cuts what was rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvrepl.ids import common_prefix

MAX_DRAFT = 16  # tokens drafted at most (a verification of 17 rows)
MAX_NGRAM = 12  # the longest match looked for
LENGTHS = 12  # match lengths the acceptance rates tell apart (longer ones count as this)
MARGIN = 0.1  # the least gain over plain decoding a draft must promise: the estimates are noisy
_EMA = 0.1  # weight of one new observation in the estimates


class Lookup:
    """The context's ids (numpy, grown in place) and the longest recent match of their tail."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.buf = np.empty(max(1024, 2 * len(ids)), dtype=np.int64)
        self.n = 0
        self.sync(ids)

    def sync(self, ids: Sequence[int]) -> None:
        """Take the ids appended to the context since the last call (they only grow)."""
        new = ids[self.n :]
        if self.n + len(new) + 1 > len(self.buf):
            grown = np.empty(2 * (self.n + len(new) + 1), dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + len(new)] = new
        self.n += len(new)

    def continuation(self, token: int, limit: int) -> tuple[int, list[int]]:
        """With `token` after the context: the length of the longest match of the context's tail
        that occurred before (the latest such), and up to `limit` ids that followed it."""
        a = self.buf
        a[self.n] = token
        end = self.n + 1  # the context and the token
        at = np.flatnonzero(a[: end - 1] == token)
        if not len(at) or limit <= 0:
            return 0, []
        length = 1
        while length < MAX_NGRAM:
            ok = at >= length
            ok[ok] = a[at[ok] - length] == a[end - 1 - length]
            if not ok.any():
                break
            at, length = at[ok], length + 1
        start = int(at[-1]) + 1
        return length, a[start : min(start + limit, end)].tolist()


class DraftPolicy:
    """How many tokens to draft: the count that makes the most tokens per unit of time, under
    the acceptance rate seen for each length of match and the measured cost of a verified row
    for that many drafted tokens (a 2-row forward costs more a row than a 9-row one);
    none unless that beats plain decoding by MARGIN. A drafted token that the answer takes
    lengthens the match, so the tokens of one draft are each judged by the rate of the match
    they would extend: a long copy drafts far, a fresh short match one token or none. A
    proposal that is not fed is still checked against the token that comes, so the rates keep
    up where nothing is drafted."""

    def __init__(self) -> None:
        # P(a drafted token is accepted | it extends a match of length m), m = 1 .. LENGTHS
        # (longer as LENGTHS): a longer match is a better guess (measured on the embedded
        # model's answers: about 0.3 for one token, 0.9 and more past eight)
        self.rate = [min(0.95, 0.2 + 0.1 * m) for m in range(1, LENGTHS + 1)]
        # cost[k - 1]: a verified row's time, in plain steps, when k tokens are drafted
        # (measured: `timed`; a count not yet seen keeps the prior and is tried, then measured)
        self.cost = [0.5] * MAX_DRAFT
        self.timings = [0] * MAX_DRAFT  # forwards timed per count of drafted tokens
        self._step_s: float | None = None

    def size(self, match: int, available: int) -> int:
        """Tokens to draft of the `available` a match of length `match` proposes."""
        best, best_gain, expected, p = 0, 1.0 + MARGIN, 0.0, 1.0
        for k in range(1, min(available, MAX_DRAFT) + 1):
            p *= self.rate[min(match + k - 1, LENGTHS) - 1]  # the first k all accepted
            expected += p  # tokens a forward gains past its own: the accepted drafts
            gain = (1.0 + expected) / (1.0 + self.cost[k - 1] * k)
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def observed(self, match: int, drafted: int, accepted: int) -> None:
        """A proposal's outcome: `accepted` of its first `drafted` tokens were what came (each
        told to the rate of its match's length, up to the first that was not)."""
        for j in range(min(drafted, accepted + 1)):
            i = min(match + j, LENGTHS) - 1
            self.rate[i] += _EMA * ((j < accepted) - self.rate[i])

    def timed(self, rows: int, seconds: float) -> None:
        """A forward of `rows` rows took `seconds`: the plain step's time, or the cost of a row
        when rows - 1 tokens are drafted."""
        if rows == 1:
            step = self._step_s
            self._step_s = seconds if step is None else step + _EMA * (seconds - step)
        elif self._step_s and rows - 1 <= MAX_DRAFT:
            cost = max(0.0, seconds / self._step_s - 1.0) / (rows - 1)
            self.cost[rows - 2] += _EMA * (min(cost, 2.0) - self.cost[rows - 2])
            self.timings[rows - 2] += 1


class Drafter:
    """One answer's drafting: proposals from its context, their outcomes told to the policy,
    and the counts for the stats line."""

    def __init__(self, ids: Sequence[int], policy: DraftPolicy, end_ids: set[int]) -> None:
        self.lookup = Lookup(ids)
        self.policy = policy
        self.end_ids = end_ids
        self.drafted = self.accepted = 0
        # the last proposal: where it starts in the context, its tokens, its match
        self._last: tuple[int, list[int], int] | None = None

    def propose(self, ids: Sequence[int], token: int, limit: int) -> list[int]:
        """Tokens to feed after `token` (which follows `ids`, the context so far), at most
        `limit`; an empty list when there is no match or drafting would not pay."""
        self.lookup.sync(ids)
        self._settle(token)
        match, guess = self.lookup.continuation(token, MAX_DRAFT)
        for i, t in enumerate(guess):
            if t in self.end_ids:  # an end token is never fed: no use drafting past it
                del guess[i:]
                break
        if not guess:
            self._last = None
            return []
        k = min(self.policy.size(match, len(guess)), limit)
        self._last = (self.lookup.n + 1, guess[: max(k, 1)], match)
        return guess[:k]

    def _settle(self, token: int) -> None:
        """Tell the policy how the last proposal fared against the ids that came after it."""
        if self._last is None:
            return
        start, guess, match = self._last
        came = [*self.lookup.buf[start : self.lookup.n].tolist(), token]
        self.policy.observed(match, len(guess), common_prefix(guess, came))
