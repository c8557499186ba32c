"""KV snapshots on disk: every conversation's K/V, kept across turns, restarts and branches, each
distinct token once.

A chunk (stfile.py's format) holds tokens ``[start, start+n)`` of some token sequence: their
``ids`` and ``layers.{i}.keys|values`` in the cache's dtype, with the fingerprint of the model
that computed them and the sha256 of all ids up to its end. Its name (kvbook.py) carries the
hashes of the ids before it and up to its end, so the chunks of a model form a tree, one path per
branch, found from the names alone; two branches share every chunk up to where they part, and
where a new branch leaves a chunk in its middle the chunk is split there: no token is stored
twice. A turn appends one chunk, so a save costs the new tokens, not the history.

`find` walks the tree along a conversation's ids (names and hashes only); `load` validates what
it hands over (framing, fingerprint, dtype and shape, CRC32s, the ids hash chain and the ids
themselves), cuts at the first chunk that fails with one note on why, and hands the tensors over
as views of the bytes read. Writes are atomic; a split writes both halves before the whole goes.
A byte budget, the store's, bounds the pool (kvbudget.py: least recently used tips of branches
go, other sessions' newest snapshots last, and the save's report says what went).

Never: decides when to save (the conversation does); deletes anything while loading; uses
``torch.load`` or pickle; follows a symbolic link in the store. The messages in SQLite are the
truth; a snapshot is only a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvrepl.errors import SnapshotError
from kvrepl.ids import common_prefix
from kvrepl.store.kvbook import (
    EMPTY,
    Pool,
    Ref,
    fsync_dir,
    pieces_between,
    remove_dead_temps,
    write_atomic,
)
from kvrepl.store.kvbudget import Eviction, evict
from kvrepl.store.stfile import (
    BadChunk,
    Chunk,
    Layers,
    Layout,
    Tensor,
    chunk_bytes,
    crc32s,
    fits,
    ids_bytes,
    ids_of,
    layout_of,
    parse_chunk,
    read_chunk,
    views,
)


@dataclass(frozen=True)
class SaveReport:
    written_tokens: int  # tokens written by this save (the new chunk, and a split chunk's)
    bytes_written: int
    seconds: float
    chunks: int  # chunks in the conversation's chain after the save
    evicted: Eviction = Eviction()  # what went to stay within the budget


@dataclass
class LoadResult:
    """A snapshot's valid part, from `start`: its ids and per chunk its tensors as views of the
    bytes read (no copy: the engine copies them once, into its cache)."""

    ids: list[int]
    chunks: list[dict[str, Tensor]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    start: int = 0

    def layer_parts(self, i: int) -> list[tuple[Tensor, Tensor]]:
        """Layer i's (keys, values) per chunk, in order."""
        return [(c[f"layers.{i}.keys"], c[f"layers.{i}.values"]) for c in self.chunks]

    @property
    def layers(self) -> Layers:
        """Every layer's whole (keys, values), joined (a copy: for checks, not the hot path)."""
        n_layers = (len(self.chunks[0]) - 1) // 2 if self.chunks else 0
        out = []
        for i in range(n_layers):
            ks, vs = zip(*self.layer_parts(i), strict=True)
            out.append((torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
        return out


class KVStore(Pool):
    """The chunk pool under `root`, within `budget` bytes (kvbook.Pool)."""

    def __init__(self, root: Path, budget: int | None = None) -> None:
        super().__init__(root) if budget is None else super().__init__(root, budget)
        self._bad: set[tuple[str, str]] = set()  # chunks a load refused: the next save replaces

    def find(self, fingerprint: str, ids: Sequence[int]) -> list[Ref]:
        """The chain of chunks whose ids are the longest prefix of `ids` found on disk, by names
        and hashes only (nothing is read or trusted yet)."""
        self.import_legacy()
        d = self.pool_dir(fingerprint)
        if self.problem(d):
            return []
        children: dict[tuple[str, int], list[Ref]] = {}
        for r in self.refs(d):
            children.setdefault((r.parent, r.start), []).append(r)
        raw = ids_bytes(ids)
        h, tip, pos, chain = hashlib.sha256(), EMPTY, 0, []
        while True:
            for r in sorted(children.get((tip, pos), []), key=lambda r: -r.end):
                if r.end > len(ids):
                    continue
                h2 = h.copy()
                h2.update(raw[8 * pos : 8 * r.end])
                if h2.hexdigest()[:16] == r.tip:
                    chain.append(r)
                    h, tip, pos = h2, r.tip, r.end
                    break
            else:
                return chain

    def find_within(
        self, fingerprint: str, ids: Sequence[int], chain: list[Ref]
    ) -> tuple[Ref, int] | None:
        """Past the chain's end, the chunk whose first tokens agree longest with `ids`, and how
        many agree (a conversation that leaves a chunk in its middle: an edit, or a client's
        answer sent back as text that tokenizes otherwise than it was generated). Reads the
        candidates' ids only; `load` validates the chunk."""
        d = self.pool_dir(fingerprint)
        pos = chain[-1].end if chain else 0
        tip = chain[-1].tip if chain else EMPTY
        best: tuple[Ref, int] | None = None
        for r in self.refs(d) if not self.problem(d) else []:
            if (r.parent, r.start) != (tip, pos) or r.end <= pos:
                continue
            n = common_prefix(ids_of(d / r.name) or [], ids, pos)
            if n and (best is None or n > best[1]):
                best = (r, n)
        return best

    def load(
        self, fingerprint: str, ids: Sequence[int], start: int = 0,
        chain: list[Ref] | None = None, part: tuple[Ref, int] | None = None,
    ) -> LoadResult:  # fmt: skip
        """The chain's chunks from `start` (a chunk boundary) on, validated against `ids`, as
        views; cut at the first chunk that fails, with one note on why. `part` (find_within's):
        a chunk after the chain of which only the first tokens agree with `ids`, validated
        whole and handed over up to there. Marks what it hands over as just used."""
        d = self.pool_dir(fingerprint)
        if problem := self.problem(d):
            return LoadResult([], notes=[f"snapshot: dropped: {problem}"])
        chain = [r for r in (self.find(fingerprint, ids) if chain is None else chain)
                 if r.start >= start]  # fmt: skip
        raw = ids_bytes(ids[: chain[-1].end]) if chain else b""
        parts: list[dict[str, Tensor]] = []
        kept: list[Chunk] = []
        reason, pos = None, start
        for r in chain:
            if not os.path.lexists(d / r.name):  # a recorded chain lost a file
                reason = (
                    f"chunk at {r.start:,} is missing" if r.start else "its first chunk is missing"
                )
                break
            try:
                got, c = self._check(d / r.name, r, fingerprint, raw, kept)
            except BadChunk as e:
                reason = f"{'it' if r.start == 0 else f'chunk at {r.start:,}'} {e}"
                self._bad.add((d.name, r.name))
                break
            parts.append(got)
            kept.append(c)
            pos = r.end
            with contextlib.suppress(OSError):
                os.utime(d / r.name)
        if reason is None and part is not None and part[0].start == pos:
            if (got := self._first_of(d, part, fingerprint, ids, kept)) is not None:
                parts.append(got)
                pos += part[1]
        notes = []
        if reason is not None and not kept and start == 0:
            notes.append(f"snapshot: dropped: {reason}")
        elif reason is not None:
            notes.append(f"snapshot: kept {pos:,} of {chain[-1].end:,} tokens: {reason}")
        return LoadResult(list(ids[start:pos]), parts, notes, start)

    def load_session(self, session_id: str, fingerprint: str) -> LoadResult:
        """The chain a session saved last, validated (the ids are the chunks' own): what a
        resumed session starts from, before its messages are compared with it."""
        pool, chain, missing = self.last_chain(session_id)
        d = self.pool_dir(fingerprint)
        if pool == d.name and (problem := self.problem(d)):  # said before any file is read
            return LoadResult([], notes=[f"snapshot: dropped: {problem}"])
        cut = self.budget_cut(session_id) if missing is not None else None
        room = "another session's save needed the room (the store's K/V budget)"
        if pool == d.name and missing == 0 and cut is not None:
            return LoadResult([], notes=[f"snapshot: dropped: {room}"])
        if pool != d.name or (missing == 0 and not self.session_chunks(session_id, fingerprint)):
            return LoadResult([])  # another model's, or every file gone: no snapshot
        ids: list[int] = []
        for r in chain:  # a chunk that does not read fails the check where it lies
            ids += ids_of(d / r.name) or [-1] * (r.end - r.start)
        result = self.load(fingerprint, ids, chain=chain)
        if missing is not None and not result.notes:
            if not result.chunks:
                result.notes.append("snapshot: dropped: its first chunk is missing")
            elif cut is not None:
                result.notes.append(f"snapshot: kept {missing:,} tokens: for the rest, {room}")
            else:
                result.notes.append(
                    f"snapshot: kept {missing:,} tokens: the chunk at {missing:,} is missing"
                )
        return result

    def _first_of(self, d: Path, part: tuple[Ref, int], fingerprint: str, ids: Sequence[int],
                  kept: list[Chunk]) -> dict[str, Tensor] | None:  # fmt: skip
        """A chunk validated whole against the ids before it and its own, then its first
        `part[1]` positions, when they are the conversation's; else None (recomputed)."""
        r, n = part
        try:
            own = ids_of(d / r.name) or []
            raw = ids_bytes([*ids[: r.start], *own])
            got, _ = self._check(d / r.name, r, fingerprint, raw, kept)
        except BadChunk:
            self._bad.add((d.name, r.name))
            return None
        if got["ids"][:n].tolist() != list(ids[r.start : r.start + n]):
            return None
        with contextlib.suppress(OSError):
            os.utime(d / r.name)
        return {k: t[:n] if k == "ids" else t[:, :, :n] for k, t in got.items()}

    @staticmethod
    def _check(
        path: Path, ref: Ref, fingerprint: str, raw: bytes, kept: list[Chunk]
    ) -> tuple[dict[str, Tensor], Chunk]:
        """Validate one chunk fully against the conversation's ids; its tensors as views."""
        buf, size, st = read_chunk(path, header_only=False)
        c, check, data_start, spans = parse_chunk(buf, size, st, path.name)
        if c.fingerprint != fingerprint:
            raise BadChunk("was made by another model")
        if (c.start, c.end, c.prefix_hash[:16]) != (ref.start, ref.end, ref.tip):
            raise BadChunk("does not match its file name")  # its name places it in the tree
        if kept and c.layout != kept[0].layout:
            raise BadChunk("has another dtype or shape than the chunks before it")
        view = memoryview(buf)[data_start:]
        pieces = [view[a:b] for a, b in spans]
        if check[0] == "sha256":
            dh = hashlib.sha256()
            for piece in pieces:
                dh.update(piece)
            ok = dh.hexdigest() == check[1]
        else:
            ok = crc32s(pieces) == check[1]
        if not ok:
            raise BadChunk("is corrupted (data checksum mismatch)")
        if bytes(pieces[0]) != raw[8 * c.start : 8 * c.end] or (
            hashlib.sha256(raw[: 8 * c.end]).hexdigest() != c.prefix_hash
        ):
            raise BadChunk("does not follow from the chunks before it (stale ids hash)")
        return views(buf, data_start, spans, c), c

    def save(self, session_id: str, ids: list[int], layers: Layers, fingerprint: str) -> SaveReport:
        """Make the pool hold `ids` and their K/V (per-layer tensors over all of ids): keep the
        chain that agrees, split the chunk where ids leave it, write one chunk for the rest;
        then record it for the session and keep the pool within its budget."""
        t0 = time.perf_counter()
        self.manifest(session_id)  # refuses an unsafe id before anything is written
        layout = layout_of(len(ids), layers)  # and K/V that are not those ids'
        d = self.pool_dir(fingerprint)
        self._clear_way(d)
        if problem := self.problem(d):
            raise SnapshotError(f"snapshot not saved: {problem}; messages are safe")
        written = nbytes = 0
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._drop_split_wholes(d)
            chain = self._trusted(d, self.find(fingerprint, ids), fingerprint, layout)
            if (split := self._split(d, chain, ids, fingerprint)) is not None:
                chain.append(split[0])
                written, nbytes = split[1], split[2]
            pos = chain[-1].end if chain else 0
            if pos < len(ids):
                name, data = chunk_bytes(ids, layers, pos, len(ids), fingerprint)
                write_atomic(d, name, data)
                chain.append(Ref.parse(name))  # type: ignore[arg-type]
                written, nbytes = written + len(ids) - pos, nbytes + len(data)
            for r in chain:
                with contextlib.suppress(OSError):
                    os.utime(d / r.name)
            self.record(session_id, d.name, chain)
            self.prune(d)
            remove_dead_temps(d)
            remove_dead_temps(self.manifest(session_id).parent)
            evicted = evict(self, {(d.name, r.name) for r in chain}, session_id)
        except OSError as e:
            raise SnapshotError(f"snapshot not saved: {e.strerror or e}; messages are safe") from e
        return SaveReport(written, nbytes, time.perf_counter() - t0, len(chain), evicted)

    def _trusted(self, d: Path, chain: list[Ref], fingerprint: str, layout: Layout) -> list[Ref]:
        """The chain up to the first chunk a load refused or whose header is not this model's
        K/V in this layout (a chain found by names alone must not take in a chunk that no load
        would accept after it); that one and the rest go, to be written again from the cache."""
        for i, r in enumerate(chain):
            ok = fits(d / r.name, r.start, r.end, fingerprint, layout)
            if (d.name, r.name) in self._bad or not ok:
                for bad in chain[i:]:
                    self._bad.discard((d.name, bad.name))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(d / bad.name)
                return chain[:i]
        return chain

    def _drop_split_wholes(self, d: Path) -> None:
        """Remove a chunk whose pieces are on disk too (a split killed before the whole went):
        its tokens stay once, in the pieces, which other branches may already hang from."""
        by_parent: dict[tuple[str, int], list[Ref]] = {}
        for r in self.refs(d):
            by_parent.setdefault((r.parent, r.start), []).append(r)
        for r in [r for group in by_parent.values() for r in group]:
            if not any(s.end < r.end for s in by_parent[(r.parent, r.start)]):
                continue  # no shorter sibling: no pieces can stand for it
            rest = {k: [s for s in v if s != r] for k, v in by_parent.items()}
            if pieces_between(rest, r.parent, r.start, r.end, r.tip):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / r.name)
                by_parent = rest

    def _clear_way(self, d: Path) -> None:
        """A link or a stray file where a folder of the pool belongs goes (never followed)."""
        for p in (self.root / "chunks", d):
            if os.path.islink(p) or (os.path.lexists(p) and not os.path.isdir(p)):
                try:
                    os.unlink(p)
                except OSError as exc:
                    msg = f"snapshot not saved: {exc.strerror}; messages are safe"
                    raise SnapshotError(msg) from None

    def _split(
        self, d: Path, chain: list[Ref], ids: list[int], fingerprint: str
    ) -> tuple[Ref, int, int] | None:
        """Where ids leave a chunk in its middle, split it there into [start, cut) and
        [cut, end) (which keeps the chunk's descendants). Returns the first half, and the
        tokens and bytes written; None where no chunk is left in its middle."""
        pos = chain[-1].end if chain else 0
        tip = chain[-1].tip if chain else EMPTY
        for r in self.refs(d):
            if r.parent != tip or r.start != pos:
                continue
            try:
                buf, size, st = read_chunk(d / r.name, header_only=False)
                c, _, data_start, spans = parse_chunk(buf, size, st, r.name)
            except BadChunk:
                continue
            got = views(buf, data_start, spans, c)
            theirs = got["ids"].tolist()
            cut = common_prefix(theirs, ids, pos)
            if not 0 < cut < len(theirs):
                continue
            old = list(ids[:pos]) + theirs  # the conversation the chunk was made for
            layers = [(got[f"layers.{i}.keys"], got[f"layers.{i}.values"])
                      for i in range(c.layout[1])]  # fmt: skip
            first, a = chunk_bytes(old, layers, pos, pos + cut, fingerprint, offset=pos)
            second, b = chunk_bytes(old, layers, pos + cut, r.end, fingerprint, offset=pos)
            new = [n for n in (first, second) if not os.path.lexists(d / n)]
            try:
                write_atomic(d, first, a)
                write_atomic(d, second, b)
            except BaseException:  # the whole stays: no half may hold its tokens twice
                for n in new:
                    with contextlib.suppress(OSError):
                        os.unlink(d / n)
                raise
            with contextlib.suppress(FileNotFoundError):  # another save saw the halves first
                os.unlink(d / r.name)
            fsync_dir(d)
            return Ref.parse(first), len(theirs), len(a) + len(b)  # type: ignore[return-value]
        return None
