"""What a prefill does with the cache it finds: the rules, in one place and without torch (the
snapshot side asks them before torch has loaded).

`reusable` is the "one token to feed" rule: a cache, in memory or on disk, may supply every
position of a prompt but the last, whose logits start the answer. `plan` is the alignment: the
common prefix of the cache and the prompt, within that rule, and what becomes of the rest. The
engine acts on the plan and yields it (events.Plan) before computing, so the conversation words
the cut from the plan the prefill carried out.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrepl.events import Plan
from kvrepl.ids import common_prefix


def reusable(ids: Sequence[int]) -> int:
    """How many positions of `ids` may come from a cache: all but the last, which is fed so that
    its logits start the answer."""
    return max(len(ids) - 1, 0)


def plan(cached: Sequence[int], ids: Sequence[int], *, reuse: bool, croppable: bool) -> Plan:
    """What a prefill of `ids` does with a cache holding `cached`: keep the common prefix, within
    `reusable`, and recompute the rest (all of it without reuse, or when the cache cannot be cut
    back where the prefix ends)."""
    n = len(cached)
    if not reuse or not ids:
        return Plan(0, len(ids), n, "no reuse" if n else "empty")
    keep = min(common_prefix(cached, ids), reusable(ids))
    if not (croppable or keep == n):
        return Plan(0, len(ids), n, "cannot cut")
    why = "empty" if not n else ("extend" if keep >= n - 1 else "cut")
    return Plan(keep, len(ids) - keep, n, why)
