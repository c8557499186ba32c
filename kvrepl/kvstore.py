"""KV snapshots on disk: a session's K/V cache, kept across turns and restarts.

Owns: the files under ``root/<session_id>/``: safetensors *chunks* ``chunk-<start:09d>``, each
covering tokens ``[start, end)`` (``ids`` int64 ``[n]``, ``layers.{i}.keys|values``
``[1, heads, n, head_dim]`` in the model's dtype) with metadata: format, version, model
fingerprint, dtype, start, n_tokens, n_layers, ``prefix_hash`` (sha256 of ALL ids ``0..end`` as
int64 LE) and ``data_crc32`` (a CRC32 of each tensor, in order ids, layers.0.keys, ...). A turn
appends one chunk, so a save costs time in the new tokens, not the history. Writes are atomic
(temp file, fsync, rename, fsync of the folder), and replacements are written before stale
chunks are deleted, so a kill at any moment leaves a valid prefix. Loading validates before it
trusts (each chunk's framing and metadata by stfile.py's own parse of the length + JSON header,
offsets that tile the file exactly; then fingerprint, hash chain and data hash here) and keeps
the longest valid prefix, with one note on why.

Never: decides when to save (the engine and REPL do); deletes anything while loading; uses
``torch.load`` or pickle; follows a symbolic link in the store. The messages in SQLite are the
truth, a snapshot is only a cache. One writer per session at a time is assumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from kvrepl.errors import SnapshotError
from kvrepl.stfile import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    BadChunk,
    Chunk,
    Layout,
    claimed_end,
    file_sig,
    parse_chunk,
    read_chunk,
    tensor_names,
)

MAX_CHUNKS = 64  # more chunks than this are merged into one on save
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CHUNK_RE = re.compile(r"chunk-(\d{9})\.safetensors")

Tensor = torch.Tensor
Layers = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class SaveReport:
    written_tokens: int  # tokens written by this save (new chunk, plus all of them on compaction)
    bytes_written: int
    seconds: float
    chunks: int  # chunk files making up the snapshot after the save


@dataclass
class LoadResult:
    """A snapshot's valid prefix: its ids, and per chunk its tensors as views of the bytes read
    (no copy: the engine copies them once, into its cache)."""

    ids: list[int]
    chunks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def layer_parts(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


_POOL: list[ThreadPoolExecutor] = []


def crc32s(buffers: list[memoryview | bytes]) -> list[int]:
    """CRC32 of each buffer, two at a time (zlib releases the GIL): a flipped byte is caught at
    memory speed, where a sha256 of the data was half of a restore."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-crc"))
    return list(_POOL[0].map(zlib.crc32, buffers))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(d: Path, name: str, data: bytes) -> os.stat_result:
    tmp = d / f".tmp-{name}-{uuid.uuid4().hex}"
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
    _fsync_dir(d)
    return os.stat(d / name)


def _layout(ids: list[int], layers: Layers) -> Layout:
    if not layers or layers[0][0].dim() != 4:
        raise ValueError("layers must be a non-empty list of [1, heads, n_tokens, head_dim] pairs")
    k0 = layers[0][0]
    shape = (1, k0.shape[1], len(ids), k0.shape[3])
    for k, v in layers:
        if tuple(k.shape) != shape or tuple(v.shape) != shape or {k.dtype, v.dtype} != {k0.dtype}:
            raise ValueError(f"every K/V must have shape {shape} and dtype {k0.dtype}")
    dname = str(k0.dtype).removeprefix("torch.")
    if dname not in DTYPES:
        raise ValueError(f"unsupported K/V dtype {k0.dtype}")
    return (dname, len(layers), shape[1], shape[3])


def _views(buf: bytes, start: int, spans: list[tuple[int, int]], c: Chunk) -> dict[str, Tensor]:
    """The chunk's tensors as views of its bytes, by name (spans in tensor_names order)."""
    dtype = DTYPES[c.layout[0]]
    shape = (1, c.layout[2], c.end - c.start, c.layout[3])
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # bytes are immutable: torch warns, and we never write
        warnings.simplefilter("ignore", UserWarning)
        for name, (a, b) in zip(tensor_names(c.layout[1]), spans, strict=True):
            t_dtype = torch.int64 if name == "ids" else dtype
            n = (b - a) // torch.empty(0, dtype=t_dtype).element_size()
            t = torch.frombuffer(buf, dtype=t_dtype, count=n, offset=start + a)
            out[name] = t if name == "ids" else t.view(shape)
    return out


class KVStore:
    """Chunked, validated KV snapshots under `root`, one folder per session."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._records: dict[str, list[Chunk]] = {}  # what we last saved/loaded, per session

    def _dir(self, session_id: str) -> Path:
        if not isinstance(session_id, str) or not _SESSION_RE.fullmatch(session_id):
            raise SnapshotError(f"snapshot: refused session id {str(session_id)[:80]!r}")
        return self.root / session_id

    def _dir_problem(self, d: Path) -> str | None:
        if os.path.islink(d):
            return "its folder is a symbolic link; refused, not followed"
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(d)]) != real_root:
            return "its folder lies outside the store"
        if os.path.lexists(d) and not os.path.isdir(d):
            return "its folder is not a folder"
        return None

    @staticmethod
    def _files(d: Path) -> dict[int, str]:
        names = os.listdir(d) if os.path.isdir(d) else []
        return {int(m.group(1)): m.group(0) for m in map(_CHUNK_RE.fullmatch, names) if m}

    def _chain(self, session_id: str, d: Path, files: dict[int, str]) -> list[Chunk]:
        """Chunks believed valid: the in-memory record if the files are unchanged, else a
        header-only scan (framing and metadata checked; data hashes are left to load)."""
        record = self._records.get(session_id)
        if record is not None:
            with contextlib.suppress(OSError):
                if all(
                    files.get(c.start) == c.name and file_sig(os.lstat(d / c.name)) == c.sig
                    for c in record
                ):
                    return record
        chain: list[Chunk] = []
        while (name := files.get(chain[-1].end if chain else 0)) is not None:
            try:
                c = parse_chunk(*read_chunk(d / name, header_only=True), name)[0]
            except BadChunk:
                break
            if chain and c.layout != chain[0].layout:
                break
            chain.append(c)
        return chain

    def save(self, session_id: str, ids: list[int], layers: Layers, fingerprint: str) -> SaveReport:
        """Make the snapshot hold exactly `ids` and their K/V, writing only what changed."""
        t0 = time.perf_counter()
        d = self._dir(session_id)
        layout = _layout(ids, layers)
        n = len(ids)
        ids_t = torch.tensor(ids, dtype=torch.int64)
        ids_b = ids_t.numpy().tobytes()
        written = nbytes = 0
        if os.path.islink(d) or (os.path.lexists(d) and not os.path.isdir(d)):
            # Never followed: the link (or stray file) itself goes, and a real folder replaces it.
            try:
                os.unlink(d)
            except OSError as exc:
                msg = f"snapshot not saved: {exc.strerror}; messages are safe"
                raise SnapshotError(msg) from None
        if problem := self._dir_problem(d):
            raise SnapshotError(f"snapshot not saved: {problem}; messages are safe")
        try:
            if not d.is_dir():
                d.mkdir(parents=True)
                _fsync_dir(self.root)
            files = self._files(d)
            kept: list[Chunk] = []
            h = hashlib.sha256()
            for c in self._chain(session_id, d, files):
                h2 = h.copy()
                h2.update(ids_b[8 * c.start : 8 * c.end])
                if (
                    c.end > n
                    or c.fingerprint != fingerprint
                    or c.layout != layout
                    or h2.hexdigest() != c.prefix_hash
                ):
                    break
                kept.append(c)
                h = h2
            pos = kept[-1].end if kept else 0
            if pos < n:  # replaces a same-named stale chunk atomically, before any delete
                c, nb = self._write_chunk(d, ids_t, layers, pos, h, fingerprint, layout)
                kept.append(c)
                written, nbytes = n - pos, nb
            self._records.pop(session_id, None)
            self._remove_except(d, {c.name for c in kept})
            self._records[session_id] = kept
        except OSError as e:
            self._records.pop(session_id, None)
            raise SnapshotError(f"snapshot not saved: {e.strerror or e}; messages are safe") from e
        if len(kept) > MAX_CHUNKS:
            with contextlib.suppress(OSError):  # the snapshot is saved; merging can wait
                c, nb = self._write_chunk(
                    d, ids_t, layers, 0, hashlib.sha256(), fingerprint, layout
                )
                self._records[session_id] = kept = [c]
                written, nbytes = written + n, nbytes + nb
                self._remove_except(d, {c.name})
        return SaveReport(written, nbytes, time.perf_counter() - t0, len(kept))

    @staticmethod
    def _write_chunk(
        d: Path,
        ids_t: torch.Tensor,
        layers: Layers,
        start: int,
        h: hashlib._Hash,
        fingerprint: str,
        layout: Layout,
    ) -> tuple[Chunk, int]:
        """Write ids[start:] and their K/V as one chunk; `h` has hashed ids[:start]."""
        end = ids_t.numel()
        tensors = {"ids": ids_t[start:end].clone()}
        for i, (k, v) in enumerate(layers):
            tensors[f"layers.{i}.keys"] = k[:, :, start:end].detach().to("cpu").contiguous()
            tensors[f"layers.{i}.values"] = v[:, :, start:end].detach().to("cpu").contiguous()
        ph = h.copy()
        ph.update(tensors["ids"].numpy().tobytes())
        names = tensor_names(len(layers))
        crcs = crc32s([tensors[key].reshape(-1).view(torch.uint8).numpy() for key in names])
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "dtype": layout[0],
            "start": str(start),
            "n_tokens": str(end - start),
            "n_layers": str(layout[1]),
            "prefix_hash": ph.hexdigest(),
            "data_crc32": ",".join(f"{c:08x}" for c in crcs),
        }
        data = st_save(tensors, metadata=meta)
        name = f"chunk-{start:09d}.safetensors"
        st = _write_atomic(d, name, data)
        return Chunk(name, start, end, ph.hexdigest(), fingerprint, layout, file_sig(st)), len(data)

    def _remove_except(self, d: Path, keep: set[str]) -> None:
        """Delete chunk files not in `keep` (latest first, so a valid prefix always remains)
        and leftover temp files."""
        stale = sorted((n for n in self._files(d).values() if n not in keep), reverse=True)
        stale += [n for n in os.listdir(d) if n.startswith(".tmp-")]
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / name)
        if stale:
            _fsync_dir(d)

    def load(self, session_id: str, fingerprint: str) -> LoadResult:
        """The longest valid prefix of the snapshot, with at most one note on what was cut."""
        d = self._dir(session_id)
        self._records.pop(session_id, None)
        if problem := self._dir_problem(d):
            return LoadResult([], [], [f"snapshot: dropped: {problem}"])
        files = self._files(d)
        kept: list[Chunk] = []
        parts: list[dict[str, torch.Tensor]] = []
        h = hashlib.sha256()
        reason: str | None = None
        pos = 0
        while True:
            name = files.get(pos)
            if name is None:
                if any(s > pos for s in files):
                    reason = f"chunk at {pos:,} is missing" if pos else "its first chunk is missing"
                break
            try:
                buf, c, views = self._check(d / name, fingerprint, h, kept)
            except BadChunk as e:
                reason = f"{'it' if pos == 0 else f'chunk at {pos:,}'} {e}"
                break
            parts.append(views)
            kept.append(c)
            pos = c.end
        self._records[session_id] = kept
        notes = []
        if reason is not None and not kept:
            notes.append(f"snapshot: dropped: {reason}")
        elif reason is not None:
            total = max([pos] + [claimed_end(d / nm) for s, nm in files.items() if s >= pos])
            of = f" of {total:,}" if total > pos else ""
            notes.append(f"snapshot: kept {pos:,}{of} tokens: {reason}")
        ids = [i for p in parts for i in p["ids"].tolist()]
        return LoadResult(ids, parts, notes)

    @staticmethod
    def _check(
        path: Path, fingerprint: str, h: hashlib._Hash, kept: list[Chunk]
    ) -> tuple[bytes, Chunk, dict[str, torch.Tensor]]:
        """Validate one chunk fully; on success `h` has also hashed its ids. Returns its bytes,
        its record and its tensors as views of those bytes."""
        buf, size, st = read_chunk(path, header_only=False)
        c, check, data_start, spans = parse_chunk(buf, size, st, path.name)
        if c.fingerprint != fingerprint:
            raise BadChunk("was made by another model")
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
        h2 = h.copy()
        h2.update(pieces[0])
        if h2.hexdigest() != c.prefix_hash:
            raise BadChunk("does not follow from the chunks before it (stale ids hash)")
        h.update(pieces[0])
        return buf, c, _views(buf, data_start, spans, c)

    def delete(self, session_id: str) -> None:
        d = self._dir(session_id)
        self._records.pop(session_id, None)
        try:
            if os.path.isdir(d) and not os.path.islink(d):
                shutil.rmtree(d)
            elif os.path.lexists(d):
                os.unlink(d)
        except OSError as e:
            raise SnapshotError(f"snapshot not deleted: {e.strerror or e}") from e

    def size_bytes(self, session_id: str) -> int:
        d = self._dir(session_id)
        if self._dir_problem(d):
            return 0
        sizes = (os.lstat(d / name) for name in self._files(d).values())
        return sum(st.st_size for st in sizes if stat.S_ISREG(st.st_mode))

    def n_tokens_on_disk(self, session_id: str) -> int:
        """Tokens in the snapshot's chain of chunks (header-level check; load validates fully)."""
        d = self._dir(session_id)
        if self._dir_problem(d):
            return 0
        chain = self._chain(session_id, d, self._files(d))
        return chain[-1].end if chain else 0
