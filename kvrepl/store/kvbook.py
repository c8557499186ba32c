"""The chunk pool's layout and bookkeeping: chunk file names (`Ref`), where the pool of a model
and the list of a session lie, which sessions use which chunks (so `kvrepl rm` frees what no
other session shares, and the budget, kvbudget.py, knows whose newest snapshot a chunk is), the
figures /stats shows, and the one-time import of a store written before the pool (a folder of
chunks per session). kvstore.py writes, reads and checks the chunks themselves.

    <root>/chunks/<fingerprint>/<start>-<n>-<parent>-<end>.safetensors
    <root>/sessions/<session_id>.json       {"chunks": ["<fingerprint>/<name>", ...]}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvrepl.errors import SnapshotError

DEFAULT_BUDGET = 4 << 30  # bytes of K/V kept on disk, all sessions together (kvbudget.py)
EMPTY = hashlib.sha256().hexdigest()[:16]  # the hash of no ids: every first chunk's parent
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FP_RE = re.compile(r"[0-9a-f]{8,64}")
_NAME_RE = re.compile(r"(\d{9})-(\d{7})-([0-9a-f]{16})-([0-9a-f]{16})\.safetensors")
_LEGACY_RE = re.compile(r"chunk-(\d{9})\.safetensors")
_TMP_RE = re.compile(r"\.tmp-.+-(\d+)-[0-9a-f]{32}")  # .tmp-<name>-<writer's pid>-<uuid>


@dataclass(frozen=True)
class Ref:
    """A chunk as its name describes it: tokens [start, end), the hash of the ids before it
    (`parent`) and of the ids up to its end (`tip`), 16 hex digits each."""

    name: str
    start: int
    end: int
    parent: str
    tip: str

    @classmethod
    def parse(cls, name: str) -> Ref | None:
        m = _NAME_RE.fullmatch(name)
        if not m:
            return None
        start, n = int(m.group(1)), int(m.group(2))
        return cls(name, start, start + n, m.group(3), m.group(4)) if n > 0 else None


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(d: Path, name: str, data: bytes) -> None:
    """Temp file, fsync, rename over `name`, fsync of the folder: all or nothing. The temp
    file's name carries the writer's pid, so that one a killed writer left can be told from one
    another process is writing now (`remove_dead_temps`)."""
    tmp = d / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def remove_dead_temps(d: Path) -> int:
    """Remove the temp files in d whose writer is dead (killed mid-write: they would lie there,
    outside the budget, for ever); a live process's are left to it. Returns how many went."""
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    gone = 0
    for name in names:
        m = _TMP_RE.fullmatch(name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / name)
                gone += 1
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no pid at all: leave it
        return True
    return True


class Pool:
    """The pool's files under `root`, within `budget` bytes."""

    def __init__(self, root: Path, budget: int = DEFAULT_BUDGET) -> None:
        self.root = Path(root)
        self.budget = budget
        self._imported = False

    def pool_dir(self, fingerprint: str) -> Path:
        if not isinstance(fingerprint, str) or not _FP_RE.fullmatch(fingerprint):
            fingerprint = hashlib.sha256(str(fingerprint).encode()).hexdigest()[:32]
        return self.root / "chunks" / fingerprint

    def manifest(self, session_id: str) -> Path:
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise SnapshotError(f"snapshot: refused session id {str(session_id)[:80]!r}")
        return self.root / "sessions" / f"{session_id}.json"

    def problem(self, d: Path) -> str | None:
        """Why folder d (or one between it and the root) cannot be used, or None."""
        p = d
        while p != self.root and self.root in p.parents:
            if os.path.islink(p):
                return "its folder is a symbolic link; refused, not followed"
            if os.path.lexists(p) and not os.path.isdir(p):
                return "its folder is not a folder"
            p = p.parent
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(d)]) != real_root:
            return "its folder lies outside the store"
        return None

    @staticmethod
    def refs(d: Path) -> list[Ref]:
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [r for r in map(Ref.parse, names) if r is not None]

    # -- which session uses what ------------------------------------------------------------
    def record(self, session_id: str, pool: str, chain: list[Ref]) -> None:
        """Add a saved chain's chunks to the session's list (for `delete`); it is the session's
        last chain (for `last_chain`)."""
        path = self.manifest(session_id)
        have = self.read_manifest(path)
        names = have | {f"{pool}/{r.name}" for r in chain}
        last = {"pool": pool, "chain": [[r.start, r.end, r.tip] for r in chain]}
        before = self._read(path)
        if names != have or last != before.get("last") or "cut" in before:
            folder = path.parent
            if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
                os.unlink(folder)  # never followed: the link goes, a real folder replaces it
            folder.mkdir(parents=True, exist_ok=True)
            data = {"chunks": sorted(names), "last": last}
            write_atomic(path.parent, path.name, json.dumps(data).encode())

    def mark_cut(self, session_id: str, start: int) -> None:
        """Note in a session's list that the budget took its last chain from `start` on (its
        resume says why); its next save (`record`) clears the note."""
        path = self.manifest(session_id)
        data = self._read(path)
        if data:
            data["cut"] = min(start, self.budget_cut(session_id) or start)
            write_atomic(path.parent, path.name, json.dumps(data).encode())

    def budget_cut(self, session_id: str) -> int | None:
        """Where the budget cut the session's last chain, if it did since the session saved."""
        cut = self._read(self.manifest(session_id)).get("cut")
        return cut if isinstance(cut, int) else None

    @staticmethod
    def _read(path: Path) -> dict:
        """A session's list, or {}: never read through a link (its own or its folder's)."""
        if os.path.islink(path.parent):
            return {}
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                data = json.loads(f.read()) if stat.S_ISREG(os.fstat(fd).st_mode) else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @classmethod
    def read_manifest(cls, path: Path) -> set[str]:
        chunks = cls._read(path).get("chunks", [])
        return {str(n) for n in chunks} if isinstance(chunks, list) else set()

    def last_chain(self, session_id: str) -> tuple[str, list[Ref], int | None]:
        """The model fingerprint, the chunks of the session's last save as the pool holds them
        now (a chunk split since counts as its halves), and where that chain lost a chunk
        (None when it is whole)."""
        path = self.manifest(session_id)
        self.import_legacy()  # a session from before the pool has its list once imported
        last = self._read(path).get("last", {})
        try:
            pool, steps = str(last["pool"]), [(int(a), int(b), str(t)) for a, b, t in last["chain"]]
        except (KeyError, TypeError, ValueError):
            return "", [], None
        if not _FP_RE.fullmatch(pool):
            return "", [], None
        by_parent = self._by_parent(pool)
        chain: list[Ref] = []
        tip = EMPTY
        for start, end, want in steps:
            path = pieces_between(by_parent, tip, start, end, want)
            if path is None:
                return pool, chain, start
            chain += path
            tip = want
        return pool, chain, None

    def _by_parent(self, pool: str) -> dict[tuple[str, int], list[Ref]]:
        """A pool's chunks by (parent, start); none where its folder cannot be used (a link is
        not even listed: nothing is counted, loaded or deleted through it)."""
        by_parent: dict[tuple[str, int], list[Ref]] = {}
        d = self.root / "chunks" / pool
        for r in [] if self.problem(d) else self.refs(d):
            by_parent.setdefault((r.parent, r.start), []).append(r)
        return by_parent

    def _on_disk(self, entries: set[str], only: str | None = None) -> set[tuple[str, Ref]]:
        """The chunks on disk now that hold what listed chunks held (of one pool, when given):
        each one itself, or the pieces it was split into when another branch left it in its
        middle (the lists name the chunks as they were saved, and a split rewrites no list)."""
        out: set[tuple[str, Ref]] = set()
        trees: dict[str, dict[tuple[str, int], list[Ref]]] = {}
        for entry in entries:
            pool, _, name = entry.partition("/")
            ref = Ref.parse(name)
            if ref is None or not _FP_RE.fullmatch(pool) or only not in (None, pool):
                continue
            if pool not in trees:
                trees[pool] = self._by_parent(pool)
            pieces = pieces_between(trees[pool], ref.parent, ref.start, ref.end, ref.tip) or []
            out |= {(pool, r) for r in pieces}
        return out

    def session_chunks(
        self, session_id: str, fingerprint: str | None = None
    ) -> list[tuple[Ref, int]]:
        """The chunks a session has used that are still on disk (of one model's, when given),
        with their sizes."""
        out = []
        only = self.pool_dir(fingerprint).name if fingerprint is not None else None
        path = self.manifest(session_id)
        self.import_legacy()
        mine = self._on_disk(self.read_manifest(path), only)
        for pool, ref in sorted(mine, key=lambda x: (x[0], x[1].start, x[1].name)):
            with contextlib.suppress(OSError):
                st = os.lstat(self.root / "chunks" / pool / ref.name)
                if stat.S_ISREG(st.st_mode):
                    out.append((ref, st.st_size))
        return out

    def session_paths(self, session_id: str) -> list[Path]:
        """The files of the session's last saved chain, in order (for tools and checks)."""
        pool, chain, _ = self.last_chain(session_id)
        return [self.root / "chunks" / pool / r.name for r in chain] if pool else []

    def size_bytes(self, session_id: str, fingerprint: str | None = None) -> int:
        return sum(size for _, size in self.session_chunks(session_id, fingerprint))

    def n_tokens_on_disk(self, session_id: str, fingerprint: str | None = None) -> int:
        """Distinct tokens the session's chunks hold (every branch it saved, once each)."""
        return sum(r.end - r.start for r, _ in self.session_chunks(session_id, fingerprint))

    def delete(self, session_id: str) -> None:
        """Forget a session: its chunks that no other session uses go."""
        path = self.manifest(session_id)
        listed, others = self.read_manifest(path), set()
        folder = path.parent
        for name in os.listdir(folder) if folder.is_dir() and not self.problem(folder) else []:
            if name.endswith(".json") and name != path.name:
                others |= self.read_manifest(folder / name)
        mine = self._on_disk(listed) - self._on_disk(others)
        try:
            for pool, ref in sorted(mine, key=lambda x: (x[0], x[1].name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / "chunks" / pool / ref.name)
            if not os.path.islink(folder):  # a list outside the store is not this one's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            legacy = self.root / session_id
            if os.path.islink(legacy):
                os.unlink(legacy)
            elif os.path.isdir(legacy):
                shutil.rmtree(legacy)
        except OSError as e:
            raise SnapshotError(f"snapshot not deleted: {e.strerror or e}") from e

    def prune(self, d: Path) -> int:
        """Remove chunks no path from the start reaches any more (their parent went: a damaged
        chunk replaced, a file removed by hand). Returns how many went."""
        refs = self.refs(d)
        gone = 0
        while True:
            tips = {r.tip for r in refs} | {EMPTY}
            orphans = [r for r in refs if r.parent not in tips]
            if not orphans:
                return gone
            for r in orphans:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / r.name)
            gone += len(orphans)
            refs = [r for r in refs if r not in orphans]

    # -- what the budget (kvbudget.py) weighs -------------------------------------------------
    def files(self) -> list[tuple[str, Ref, os.stat_result]]:
        """Every chunk in the pool: (model fingerprint, name, stat)."""
        out: list[tuple[str, Ref, os.stat_result]] = []
        base = self.root / "chunks"
        if self.problem(base) or not base.is_dir():
            return out
        for pool in sorted(os.listdir(base)):
            d = base / pool
            if os.path.islink(d) or not d.is_dir():
                continue
            for r in self.refs(d):
                with contextlib.suppress(OSError):
                    st = os.lstat(d / r.name)
                    if stat.S_ISREG(st.st_mode):
                        out.append((pool, r, st))
        return out

    def pool_bytes(self) -> int:
        return sum(st.st_size for _, _, st in self.files())

    # -- a store from before the pool ---------------------------------------------------------
    def import_legacy(self) -> None:
        """Move each `<root>/<session_id>/chunk-<start>.safetensors` chain into the pool, once:
        its chunks keep their bytes and get their pool names, up to the first that does not
        read (left out: it was never trusted); then the old folder goes."""
        if self._imported:
            return
        self._imported = True
        with contextlib.suppress(OSError):
            for sid in sorted(os.listdir(self.root)) if self.root.is_dir() else []:
                d = self.root / sid
                if sid in ("chunks", "sessions") or not SESSION_ID.fullmatch(sid):
                    continue
                if os.path.islink(d) or not d.is_dir():
                    continue
                self._import_session(sid, d)

    def _import_session(self, sid: str, d: Path) -> None:
        from kvrepl.store.stfile import BadChunk, parse_chunk, read_chunk  # torch: only here

        files = {int(m.group(1)): m.group(0) for m in map(_LEGACY_RE.fullmatch, os.listdir(d)) if m}
        pos, parent, moved = 0, EMPTY, []
        while (name := files.get(pos)) is not None:
            try:
                c = parse_chunk(*read_chunk(d / name, header_only=True), name)[0]
            except BadChunk:
                break
            tip = c.prefix_hash[:16]
            new = f"{c.start:09d}-{c.end - c.start:07d}-{parent}-{tip}.safetensors"
            target = self.pool_dir(c.fingerprint)
            target.mkdir(parents=True, exist_ok=True)
            os.replace(d / name, target / new)
            moved.append((target.name, Ref(new, c.start, c.end, parent, tip)))
            pos, parent = c.end, tip
        for pool in {p for p, _ in moved}:
            self.record(sid, pool, [r for p, r in moved if p == pool])
        shutil.rmtree(d, ignore_errors=True)


def pieces_between(
    by_parent: dict[tuple[str, int], list[Ref]], tip: str, start: int, end: int, want: str
) -> list[Ref] | None:
    """Chunks from `start` (after `tip`) to `end` ending in hash `want`: the chunk itself, or
    the pieces it was split into."""
    for r in sorted(by_parent.get((tip, start), []), key=lambda r: -r.end):
        if r.end == end and r.tip == want:
            return [r]
        if r.end < end and (rest := pieces_between(by_parent, r.tip, r.end, end, want)) is not None:
            return [r, *rest]
    return None
