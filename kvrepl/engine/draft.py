"""Prompt-lookup drafting: guesses of the next tokens taken from the conversation itself (the
longest recent match of its last tokens earlier in it, and what followed there, as transformers'
prompt_lookup_num_tokens and llama.cpp's ngram lookup do), and how many of them are worth
verifying.

A copy the answer recases (a list repeated capitalised, as small models do) is matched
case-folded (`Recase`) and drafted recased: the exact lookup finds nothing past each word.

Owns: the lookup over the context's ids (`Lookup`, `Recase`), and one answer's proposals and
their outcomes (`Drafter`); how many of a proposal's tokens to draft is policy.py's. It never
runs the model and never touches the cache: the engine (engine.py) feeds the drafts, verifies
them and cuts what was rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvrepl.engine.policy import ANSWER, BEFORE, MAX_DRAFT, DraftPolicy
from kvrepl.ids import common_prefix

MAX_NGRAM = 32  # the longest match looked for
_FEW = 8  # places _longest extends all at once
_MANY = 48  # places of a token past which Lookup matches with numpy (_longest), not a loop


def _longest(a: np.ndarray, end: int) -> tuple[int, int]:
    """The longest match (up to MAX_NGRAM) of a[:end]'s tail that occurred before, the latest
    such: its length and where it ends (0, -1 if a[end - 1] never occurred before). Places are
    narrowed a token at a time while many are left, then the few left are extended together."""
    at = np.flatnonzero(a[: end - 1] == a[end - 1])
    if not len(at):
        return 0, -1
    length = 1
    while length < MAX_NGRAM and len(at) > _FEW:
        ok = at >= length
        ok[ok] = a[at[ok] - length] == a[end - 1 - length]
        if not ok.any():
            return length, int(at[-1])
        at, length = at[ok], length + 1
    n = MAX_NGRAM - length
    if n <= 0:
        return length, int(at[-1])
    back = np.arange(length, length + n)
    where = at[:, None] - back  # each place's earlier tokens, nearest first
    same = (where >= 0) & (a[np.maximum(where, 0)] == a[np.maximum(end - 1 - back, 0)])
    grown = np.where(same.all(axis=1), n, same.argmin(axis=1))
    best = int(grown.max())
    return length + best, int(at[grown == best][-1])


class Lookup:
    """The context's ids and the longest recent match of their tail (and, with a Recase, of
    the ids case-folded: a copy the answer recases). `buf` (numpy) holds the ids and one more."""

    def __init__(self, ids: Sequence[int], recase: Recase | None = None) -> None:
        self.recase = recase
        self.buf = np.empty(max(1024, 2 * len(ids)), dtype=np.int64)
        self.folded = np.empty_like(self.buf) if recase else None
        # the ids as ints, and where each occurs: a match is a few comparisons (numpy: ~30 us)
        self.ids: list[int] = []
        self.fids: list[int] = []
        self.where: dict[int, list[int]] = {}
        self.fwhere: dict[int, list[int]] = {}
        self.n = 0
        self.at = -1  # where the match of the last guess ends (-1: none)
        self.sync(ids)

    def sync(self, ids: Sequence[int]) -> None:
        """Take the ids appended to the context since the last call (they only grow)."""
        new = ids[self.n :]
        if self.n + len(new) + 1 > len(self.buf):
            size = 2 * (self.n + len(new) + 1)
            self.buf = np.resize(self.buf, size)
            if self.folded is not None:
                self.folded = np.resize(self.folded, size)
        folded = [self.recase.fold(t) for t in new] if self.recase is not None else []
        self.buf[self.n : self.n + len(new)] = new  # (after all that can fail)
        _index(self.ids, self.where, new)
        if self.folded is not None:
            self.folded[self.n : self.n + len(new)] = folded
            _index(self.fids, self.fwhere, folded)
        self.n += len(new)

    def continuation(self, token: int, limit: int) -> tuple[int, list[int]]:
        """With `token` after the context: the length of the longest match of the context's tail
        that occurred before (the latest such), and up to `limit` ids that followed it."""
        self.buf[self.n] = token
        length, at = self._match(self.buf, self.ids, self.where, token)
        self.at = at
        if length == 0 or limit <= 0:
            return 0, []
        return length, self.buf[at + 1 : min(at + 1 + limit, self.n + 1)].tolist()

    def _match(self, arr: np.ndarray, ids: list[int], where: dict[int, list[int]],
               token: int) -> tuple[int, int]:  # fmt: skip
        """_longest(arr, n + 1), `token` at arr[n], from its places in `ids`: the latest first,
        each extended back while it matches; numpy's way where the token occurs very often."""
        at = where.get(token)
        if not at:
            return 0, -1
        if len(at) > _MANY:
            return _longest(arr, self.n + 1)
        n, best, best_at = self.n, 0, -1
        for p in reversed(at):
            length = 1
            while length < MAX_NGRAM and length <= p and ids[p - length] == ids[n - length]:
                length += 1
            if length > best:
                best, best_at = length, p
                if best == MAX_NGRAM:
                    break
        return best, best_at

    def guess(self, token: int, limit: int) -> tuple[int, list[int], bool]:
        """What follows `token` by the longest match: the exact one's continuation, or a
        recased copy's where that match is longer and gives tokens (and then True); `at` is
        where the match taken ends."""
        match, guess = self.continuation(token, limit)
        folded, recased = self.recased(token, limit, match)
        if folded and recased:  # a longer match where the answer recases its copy (a list)
            return folded, recased, True
        return match, guess, False

    def recased(self, token: int, limit: int, exact: int) -> tuple[int, list[int]]:
        """A longer match than `exact` of the tail case-folded, where the tail recases what it
        copies (capitalises its words, say) in one way: the match's length, and up to `limit`
        ids that followed it, recased that way; (0, []) if there is none."""
        if self.recase is None or self.folded is None or limit <= 0 or exact >= MAX_NGRAM:
            return 0, []  # (no match is longer than MAX_NGRAM)
        end = self.n + 1
        self.buf[self.n] = token
        self.folded[self.n] = folded = self.recase.fold(token)
        length, at = self._match(self.folded, self.fids, self.fwhere, folded)
        if length <= exact:
            return 0, []
        source = self.buf[at - length + 1 : at + 1].tolist()
        tail = self.buf[end - length : end].tolist()
        changes = {self.recase.change(s, t) for s, t in zip(source, tail, strict=True) if s != t}
        if len(changes) != 1 or None in changes:
            return 0, []  # a match that is not one and the same recasing
        mode = changes.pop()
        out: list[int] = []
        prev = token
        for t in self.buf[at + 1 : min(at + 1 + limit, end)].tolist():
            ids = self.recase.apply(t, prev, mode)
            if ids is None:
                break
            out += ids
            prev = t
        if out:  # the recased copy is the guess (`guess` takes it): its match's end
            self.at = at
        return length, out[:limit]


def _index(ids: list[int], where: dict[int, list[int]], new: Sequence[int]) -> None:
    """Append `new` to `ids`, each at its position in `where`."""
    for t in new:
        t = int(t)
        where.setdefault(t, []).append(len(ids))
        ids.append(t)


class Recase:
    """A tokenizer's tokens up to the case of their first letter: `fold` maps a token to its
    lowercase form's id (itself if there is none), `change` names how one token recases another
    ("upper" or "lower" its first letter), `apply` recases a token that begins a word that way,
    as the tokens the tokenizer makes of the recased text. ASCII letters only: the byte-level
    (GPT-2) and SentencePiece vocabularies keep them as themselves."""

    _LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._unknown = getattr(tokenizer, "unk_token_id", None)
        self._folds: dict[int, int] = {}
        self._strs: dict[int, str] = {}  # the vocabulary's string of a token
        self._texts: dict[int, str] = {}  # its text
        self._applied: dict[tuple[int, str], list[int] | None] = {}

    def _str(self, t: int) -> str:
        """The token's vocabulary string; "" for an id the tokenizer has none for (a padded
        vocabulary's rows past its tokens) or one that is not text."""
        s = self._strs.get(t)
        if s is None:
            got = self.tok.convert_ids_to_tokens(t)
            s = self._strs[t] = got if isinstance(got, str) else ""
        return s

    def _text(self, t: int) -> str:
        s = self._texts.get(t)
        if s is None:
            s = self._texts[t] = self.tok.decode([t])
        return s

    def _id(self, token: str) -> int | None:
        """The id of a vocabulary string, None if the vocabulary has none."""
        i = self.tok.convert_tokens_to_ids(token)
        return None if i is None or (i == self._unknown and token != self.tok.unk_token) else i

    def fold(self, t: int) -> int:
        f = self._folds.get(t)
        if f is None:
            s = self._str(t)
            lower = s.translate(self._LOWER)
            f = self._folds[t] = t if lower == s else (self._id(lower) if s else None) or t
        return f

    @staticmethod
    def _first(s: str) -> int:
        """Where the first letter of a token's text is (past a space marker), or -1."""
        i = 1 if s[:1] in ("\u0120", "\u2581", " ") else 0
        return i if s[i : i + 1].isascii() and s[i : i + 1].isalpha() else -1

    def change(self, source: int, target: int) -> str | None:
        """How `target` recases `source`: "upper" or "lower" its first letter, else None."""
        s, t = self._str(source), self._str(target)
        i = self._first(s)
        if i < 0 or len(s) != len(t) or s[:i] != t[:i] or s[i + 1 :] != t[i + 1 :]:
            return None
        if t[i] == s[i].upper() != s[i]:
            return "upper"
        if t[i] == s[i].lower() != s[i]:
            return "lower"
        return None

    def apply(self, t: int, prev: int, mode: str) -> list[int] | None:
        """`t` recased `mode` if it begins a word (after a space marker, or after a token that
        ends in neither a letter nor a digit); None if the tokenizer cannot give it back."""
        i = self._first(self._str(t))
        if i < 0 or (i == 0 and self._text(prev)[-1:].isalnum()):
            return [t]  # not a word's start: as it is
        key = (t, mode)
        if key not in self._applied:
            self._applied[key] = self._recased(t, i, mode)
        return self._applied[key]

    def _recased(self, t: int, i: int, mode: str) -> list[int] | None:
        """Token t (its first letter at i of its string) recased: the vocabulary's one token,
        else what the tokenizer makes of the recased text, if that gives the text back and
        starts with a space marker exactly where t does (a SentencePiece tokenizer's dummy
        prefix would not)."""
        s = self._str(t)
        one = self._id(_recase_at(s, i, mode))
        if one is not None:
            return [one]
        text = self._text(t)
        j = next((k for k, c in enumerate(text) if c.isalpha()), -1)
        if j < 0:
            return None
        new = _recase_at(text, j, mode)
        ids = list(self.tok.encode(new, add_special_tokens=False))
        if not ids or self.tok.decode(ids) != new or self._first(self._str(ids[0])) != i:
            return None
        return ids


def _recase_at(s: str, i: int, mode: str) -> str:
    """s with its character i upper- or lowercased (mode "upper" or "lower")."""
    return s[:i] + (s[i].upper() if mode == "upper" else s[i].lower()) + s[i + 1 :]


class Drafter:
    """One answer's drafting: proposals from its context, their outcomes told to the policy,
    and the counts for the stats line."""

    def __init__(self, ids: Sequence[int], policy: DraftPolicy, end_ids: set[int],
                 recase: Recase | None = None) -> None:  # fmt: skip
        self.lookup = Lookup(ids, recase)
        self.start = len(ids)  # where the answer starts: a match's source is before it, or in it
        self.policy = policy
        self.end_ids = end_ids
        self.drafted = self.accepted = 0
        self.recased = 0  # proposals from a recased copy (the tests ask)
        # the last proposal was worth drafting (were there room): the answer is copying, and a
        # device that runs ahead of the host waits to feed the next token with its drafts
        self.copying = False
        # the last proposal: where it starts in the context, its tokens, its match and source
        self._last: tuple[int, list[int], int, int] | None = None

    def propose(self, ids: Sequence[int], token: int, limit: int) -> list[int]:
        """Tokens to feed after `token` (which follows `ids`, the context so far), at most
        `limit`; an empty list when there is no match or drafting would not pay."""
        self.lookup.sync(ids)
        self._settle(token)
        match, guess, recased = self.lookup.guess(token, MAX_DRAFT)
        self.recased += recased
        for i, t in enumerate(guess):
            if t in self.end_ids:  # an end token is never fed: no use drafting past it
                del guess[i:]
                break
        if not guess:
            self._last, self.copying = None, False
            return []
        # where the drafted tokens come from: the prompt, or the answer (its first tokens too)
        source = BEFORE if self.lookup.at + 1 < self.start else ANSWER
        size = self.policy.size(match, len(guess), source)
        self.copying = size > 0
        k = max(0, min(size, limit))
        self._last = (self.lookup.n + 1, guess[: max(k, 1)], match, source)
        return guess[:k]

    def _settle(self, token: int) -> None:
        """Tell the policy how the last proposal fared against the ids that came after it."""
        if self._last is None:
            return
        start, guess, match, source = self._last
        came = [*self.lookup.ids[start:], token]
        self.policy.observed(match, len(guess), common_prefix(guess, came), source)
