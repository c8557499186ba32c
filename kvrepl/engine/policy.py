"""How many drafted tokens to verify (`DraftPolicy`): an estimate of how often a drafted token
is accepted, per length of the match that proposed it, and of what a verified row costs against
a plain step, per number of drafted tokens, both measured as the engine goes; none unless
drafting promises to beat plain decoding. Where the drafts come from is draft.py's.
"""

from __future__ import annotations

MAX_DRAFT = 16  # tokens drafted at most (a verification of 17 rows)
LENGTHS = 32  # match lengths the acceptance rates tell apart (longer ones count as this)
MARGIN = 0.1  # the least gain over plain decoding a draft must promise: the estimates are noisy
_EMA = 0.1  # weight of one new timing in the cost estimates
MEMORY = 64  # outcomes an acceptance rate remembers (older ones fade: the answer's kind moves)
PRIOR_WEIGHT = 4.0  # outcomes the prior rate counts as
PRIOR_COST = 0.5  # a verified row's cost, in plain steps, before any is measured
RELAX = 0.02  # how far a cost above the prior moves back to it per proposal not drafted
# Where the match's earlier occurrence lies, each with rates of its own: before the answer (a
# copy of what the prompt holds: code to fix, a list to repeat) or in the answer itself (the
# answer repeating its own words, as prose does, where far fewer drafts are taken)
BEFORE, ANSWER = 0, 1


class DraftPolicy:
    """How many tokens to draft: the count that makes the most tokens per unit of time, under
    the acceptance rate seen for each length of match and the measured cost of a verified row
    for that many drafted tokens (a 2-row forward costs more a row than a 9-row one);
    none unless that beats plain decoding by MARGIN. A drafted token that the answer takes
    lengthens the match, so the tokens of one draft are each judged by the rate of the match
    they would extend: a long copy drafts far, a fresh short match one token or none. A
    match in the prompt and one in the answer itself are rated apart (`BEFORE`, `ANSWER`):
    pooled, the prose that repeats its own phrases made a copy of the prompt start slowly, and
    the rates learnt on copies drafted where prose does not pay. A proposal that is not fed is
    still checked against the token that comes, so the rates keep up where nothing is
    drafted."""

    def __init__(self) -> None:
        # P(a drafted token is accepted | it extends a match of length m), m = 1 .. LENGTHS
        # (longer as LENGTHS): a longer match is a better guess (measured on the embedded
        # model's answers: about 0.3 for one token, 0.9 and more past eight)
        # (rate[source][m - 1], source BEFORE or ANSWER)
        self.prior = [min(0.95, 0.2 + 0.1 * m) for m in range(1, LENGTHS + 1)]
        self.rate = [list(self.prior) for _ in (BEFORE, ANSWER)]
        # outcomes told per rate (faded), and of them the accepted
        self.seen = [[0.0] * LENGTHS for _ in (BEFORE, ANSWER)]
        self.hits = [[0.0] * LENGTHS for _ in (BEFORE, ANSWER)]
        # cost[k - 1]: a verified row's time, in plain steps, when k tokens are drafted
        # (measured: `timed`; a count not yet timed is priced by `priced`, tried, then measured)
        self.cost = [PRIOR_COST] * MAX_DRAFT
        self.timings = [0] * MAX_DRAFT  # forwards timed per count of drafted tokens
        self._step_s: float | None = None
        self.pinned = False  # rates and costs held where `pin` set them

    def pin(self, rate: float, cost: float) -> None:
        """Hold every acceptance rate at `rate` and every row's cost at `cost`, whatever the
        outcomes and timings (a check that must draft on any match, on any machine's speed)."""
        self.rate = [[rate] * LENGTHS for _ in (BEFORE, ANSWER)]
        self.cost = [cost] * MAX_DRAFT
        self.pinned = True

    def priced(self) -> list[float]:
        """A verified row's cost for each count of drafted tokens: the measured one; for a
        count never timed, that of the largest timed count below it (a row costs about as much
        once the rows make the forward compute-bound), else the prior. Without this a count
        past the ones timed would keep the prior and never be tried (measured on the embedded
        model: 5 tokens at most in a copy, where 16 pay)."""
        out, last = list(self.cost), None
        for i, n in enumerate(self.timings):
            if n:
                last = self.cost[i]
            elif last is not None:
                out[i] = last
        return out

    def size(self, match: int, available: int, source: int = BEFORE) -> int:
        """Tokens to draft of the `available` a match of length `match` proposes, its earlier
        occurrence before the answer or in it (`source`)."""
        best, best_gain, expected, p = 0, 1.0 + MARGIN, 0.0, 1.0
        cost, rate = self.priced(), self.rate[source]
        for k in range(1, min(available, MAX_DRAFT) + 1):
            p *= rate[min(match + k - 1, LENGTHS) - 1]  # the first k all accepted
            expected += p  # tokens a forward gains past its own: the accepted drafts
            gain = (1.0 + expected) / (1.0 + cost[k - 1] * k)
            if gain > best_gain:
                best, best_gain = k, gain
        if not best:
            self._relax()
        return best

    def _relax(self) -> None:
        """Nothing drafted: each cost above the prior moves RELAX of the way back to it. A cost
        is only measured when that many tokens are drafted, so one slow forward (another
        process took the core) priced above every gain would otherwise stop drafting for the
        rest of the session (untimed counts are priced as the timed one below them); now the
        policy tries again after some 100 proposals, and a cost that is truly high is measured
        again as high."""
        if self.pinned:
            return
        for i, c in enumerate(self.cost):
            if c > PRIOR_COST:
                self.cost[i] = c + RELAX * (PRIOR_COST - c)

    def observed(self, match: int, drafted: int, accepted: int, source: int = BEFORE) -> None:
        """A proposal's outcome: `accepted` of its first `drafted` tokens were what came (each
        told to the rate of its match's length and source, up to the first that was not)."""
        if self.pinned:
            return
        keep = 1.0 - 1.0 / MEMORY
        rate, seen, hits = self.rate[source], self.seen[source], self.hits[source]
        for j in range(min(drafted, accepted + 1)):
            i = min(match + j, LENGTHS) - 1
            seen[i] = seen[i] * keep + 1.0
            hits[i] = hits[i] * keep + (j < accepted)
            rate[i] = (hits[i] + PRIOR_WEIGHT * self.prior[i]) / (seen[i] + PRIOR_WEIGHT)

    def timed(self, rows: int, seconds: float) -> None:
        """A forward of `rows` rows took `seconds`: the plain step's time, or the cost of a row
        when rows - 1 tokens are drafted. A count's first timings are averaged (the first
        replaces the prior), later ones weigh _EMA: a count tried once at its true cost must not
        keep nine tenths of the prior's, which would price it out of being tried again."""
        if self.pinned:
            return
        if rows == 1:
            step = self._step_s
            self._step_s = seconds if step is None else step + _EMA * (seconds - step)
        elif self._step_s and rows - 1 <= MAX_DRAFT:
            cost = max(0.0, seconds / self._step_s - 1.0) / (rows - 1)
            i = rows - 2
            self.timings[i] += 1
            self.cost[i] += max(_EMA, 1.0 / self.timings[i]) * (min(cost, 2.0) - self.cost[i])
