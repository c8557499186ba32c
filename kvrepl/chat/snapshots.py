"""When a conversation's K/V goes to disk and comes back: the conversation's side of the
snapshot store (kvstore.py).

Before a turn runs its ids, `Snapshots.bring` gives the engine the longest of what its cache holds
in memory and what the disk holds for those ids (a resumed session, a branch gone back to, an
edit back to an earlier text): chunks from the last chunk boundary the memory still agrees with
are loaded, validated, and copied into the cache, and one line says what happened. After a turn,
`save` writes what is new. The engine and the store do the work; this decides when.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvrepl.engine.plan import reusable
from kvrepl.errors import SnapshotError
from kvrepl.ids import common_prefix

MIN_GAIN = 16  # tokens the disk must hold beyond the memory before a load is worth it


class Snapshots:
    def __init__(self, kv: Callable[[], Any]) -> None:
        self._kv = kv  # the KVStore, opened on first use (it imports torch)

    @property
    def kv(self) -> Any:
        return self._kv()

    def bring(self, engine: Any, fingerprint: str, ids: list[int], session_id: str,
              has_answers: bool, others: dict[str, str] | None = None) -> list[str]:  # fmt: skip
        """Bring the cache to the longest prefix of `ids` found in memory or on disk, leaving
        at least one token to feed. Returns one line per thing worth saying. `others`: the
        fingerprints of this model's K/V this run does not use (the other kv_bits), each with
        the line that says why a session saved there recomputes."""
        if not engine.reuse or len(ids) < 2:
            return []
        if not engine.can_cut:
            return ["snapshot: not kept for this model (its chunked or linear-attention layers "
                    "cannot be saved)"]  # fmt: skip
        fresh = not engine.cached_tokens
        chain = self.kv.find(fingerprint, ids[: reusable(ids)])
        if fresh and (result := self._resume(session_id, fingerprint, ids, chain)) is not None:
            pass  # the session's own snapshot, cut by the engine where the messages differ
        elif (result := self.from_pool(engine, fingerprint, ids, chain)) is None:
            if not (fresh and has_answers):
                return []
            return [self._why_none(session_id, fingerprint, others or {})]
        notes = engine.restore(result)
        if notes or not result.chunks:  # a cut snapshot's note already says what was kept
            return notes
        n = engine.cached_tokens
        if fresh:
            return [f"snapshot: restored {n:,} cached tokens from disk"]
        return [f"cache: restored {n - result.start:,} tokens of this branch from disk"]

    def from_pool(self, engine: Any, fingerprint: str, ids: list[int],
                  chain: list | None = None) -> Any:  # fmt: skip
        """The pool's chunks for `ids` (`chain`: the whole chunks found already; then the first
        tokens of a chunk the ids leave in its middle) from where the memory stops agreeing,
        when they hold at least MIN_GAIN tokens more than the memory keeps; else None. The
        server's requests come in by this door too."""
        usable = ids[: reusable(ids)]
        chain = self.kv.find(fingerprint, usable) if chain is None else chain
        part = self.kv.find_within(fingerprint, usable, chain)  # a chunk left in its middle
        end = part[0].start + part[1] if part else chain[-1].end if chain else 0
        keep = engine.align(ids).keep
        if end < keep + MIN_GAIN:
            return None
        starts = [r.start for r in chain] + ([part[0].start] if part else [])
        start = max((s for s in starts if s <= keep), default=0)
        return self.kv.load(fingerprint, ids, start=start, chain=chain, part=part)

    def _resume(self, session_id: str, fingerprint: str, ids: list[int], chain: list) -> Any:
        """A session opened afresh: its last saved snapshot, when it agrees with the messages
        at least as far as the chunks found by them (it does, unless they changed behind
        kvrepl's back or another process saved another branch). On a tie it is the session's
        own: restored whatever its length, where the chunks found would need MIN_GAIN tokens."""
        last = self.kv.load_session(session_id, fingerprint)
        if not last.chunks and not last.notes:
            return None
        agree = common_prefix(last.ids, ids)
        return last if agree >= (chain[-1].end if chain else 0) or last.notes else None

    def _why_none(self, session_id: str, fingerprint: str, others: dict[str, str]) -> str:
        pool, chain, _ = self.kv.last_chain(session_id)
        why = {self.kv.pool_dir(fp).name: line for fp, line in others.items()}
        if chain and pool in why:
            return why[pool]
        if chain and pool != self.kv.pool_dir(fingerprint).name:
            return "snapshot: dropped: it was made by another model"
        return "snapshot: none on disk for this session; recomputing from the messages"

    def save(self, session_id: str, engine: Any, fingerprint: str) -> list[str]:
        """Write what the turn added to the pool; a warning line when it could not, and a line
        when the pool's budget made it drop cached tokens (another session's too)."""
        if not engine.can_cut or not engine.cached_tokens:
            return []
        ids, layers = engine.export()
        try:
            report = self.kv.save(session_id, ids, layers, fingerprint)
        except (SnapshotError, OSError, ValueError) as exc:
            return [f"warning: {exc}"]
        line = report.evicted.line(self.kv.budget)
        return [line] if line else []
