"""The K/V pool's byte budget: what a save removes so that the pool fits, and the report of it.

The budget is the store's, one for every session and model together (the config file,
KVREPL_KV_BUDGET_MB or --kv-budget-mb; never a session's `/set`). After a save, tips of branches
go, least recently used first: first those that are no session's newest snapshot, and only then
the tips of other sessions' newest snapshots. The chain the save just wrote never goes. The
report (`Eviction`) says what went and whose newest snapshot was cut, so that the saving
session says so in one line; a session cut so is marked (its list of chunks says where), and
says why on resume. kvbook.py lays out
the pool and keeps its books; this decides what leaves it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from kvrepl.store.kvbook import SESSION_ID, Pool


@dataclass(frozen=True)
class Eviction:
    """What one save removed to stay within the budget: chunks, their tokens and bytes, and the
    other sessions whose newest snapshot lost tokens (their ids)."""

    chunks: int = 0
    tokens: int = 0
    bytes: int = 0
    cut: tuple[str, ...] = ()

    def line(self, budget: int) -> str | None:
        """One line for the user, or None when nothing went."""
        if not self.chunks:
            return None
        whose = "of older branches"
        if self.cut:
            whose += f" and of the newest snapshot of session {', '.join(self.cut)}"
        return (f"snapshot: the K/V pool is over its budget (kv_budget_mb {budget >> 20:,}): "
                f"dropped {self.tokens:,} cached tokens {whose}")  # fmt: skip


def evict(pool: Pool, keep: set[tuple[str, str]], saver: str) -> Eviction:
    """Remove tips of branches (never one in `keep`: (model fingerprint, chunk name)) until the
    pool fits its budget: no session's newest snapshot first, then other sessions' newest, each
    least recently used first. `saver`: the session saving now (its own newest is `keep`)."""
    files = pool.files()
    total = sum(st.st_size for _, _, st in files)
    if total <= pool.budget:
        return Eviction()
    newest = newest_chains(pool)
    chunks = tokens = nbytes = 0
    cut: set[str] = set()
    while total > pool.budget:
        parents = {(fp, r.parent) for fp, r, _ in files}
        leaves = [(fp, r, st) for fp, r, st in files
                  if (fp, r.tip) not in parents and (fp, r.name) not in keep]  # fmt: skip
        if not leaves:
            break
        fp, r, st = min(leaves, key=lambda f: ((f[0], f[1].name) in newest, f[2].st_mtime_ns))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pool.root / "chunks" / fp / r.name)
        files = [f for f in files if not (f[0] == fp and f[1].name == r.name)]
        total -= st.st_size
        chunks, tokens, nbytes = chunks + 1, tokens + r.end - r.start, nbytes + st.st_size
        for sid in newest.get((fp, r.name), set()) - {saver}:
            cut.add(sid)
            pool.mark_cut(sid, r.start)
    return Eviction(chunks, tokens, nbytes, tuple(sorted(cut)))


def newest_chains(pool: Pool) -> dict[tuple[str, str], set[str]]:
    """(model fingerprint, chunk name) -> the sessions whose last saved chain holds it."""
    out: dict[tuple[str, str], set[str]] = {}
    folder = pool.root / "sessions"
    if pool.problem(folder) or not folder.is_dir():
        return out
    for name in sorted(os.listdir(folder)):
        sid = name.removesuffix(".json")
        if name.endswith(".json") and SESSION_ID.fullmatch(sid):
            fp, chain, _ = pool.last_chain(sid)
            for r in chain:
                out.setdefault((fp, r.name), set()).add(sid)
    return out
