"""Token id sequences: how far two agree. The one copy, on the ground floor, for the engine's
cache plan, the store's chunks and the drafter's accepted tokens."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """How many of `a`'s first ids agree with `b` from `start` on."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i
