"""One KV snapshot chunk file, read and checked before anything in it is trusted.

Owns the chunk file format: safetensors framing (an 8-byte little-endian header length, a JSON
header, tensor data) carrying ``ids`` and ``layers.{i}.keys|values`` with kvrepl's metadata
(format, version, fingerprint, dtype, start, n_tokens, n_layers, prefix_hash, data_crc32); reading
a chunk without following links or blocking on odd files; and its own parse of the header: no
duplicate keys, offsets that tile the data exactly, metadata that agrees with the tensors and
the file name. A chunk that fails raises `BadChunk`, whose message is a predicate fit for a note.

It also makes a chunk's bytes (`chunk_bytes`), its tensors' views (`views`) and their CRC32s.
Never writes, deletes or decides which chunks make up a snapshot (kvstore.py does).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

FORMAT = "kvrepl-kv"
FORMAT_VERSION = "2"  # 2: a CRC32 per tensor (checked at memory speed); 1: one sha256 of the data
READABLE_VERSIONS = ("1", "2")
_MAX_HEADER = 16 << 20
_ST_CODE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int8: "I8",  # kv_bits 8: a position's row is head_dim int8 values, then its scale's bytes
}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I8": 1}
DTYPES = {str(d).removeprefix("torch."): d for d in _ST_CODE if d != torch.int64}

Layout = tuple[str, int, int, int]  # dtype name, n_layers, kv heads, head_dim
Tensor = torch.Tensor
Layers = list[tuple[Tensor, Tensor]]


class BadChunk(Exception):
    """A chunk that is not trusted; the message is a predicate fit for a note ("is truncated")."""


@dataclass(frozen=True)
class Chunk:
    name: str
    start: int
    end: int
    prefix_hash: str
    fingerprint: str
    layout: Layout
    sig: tuple[int, int, int]  # st_size, st_mtime_ns, st_ino when last seen


# How a chunk's tensor data is checked: ("sha256", hex of all of it) in format 1, or
# ("crc32", one CRC per tensor, in tensor_names order) in format 2.
DataCheck = tuple[str, str | list[int]]
Header = tuple[Chunk, DataCheck, int, list[tuple[int, int]]]  # chunk, check, data start, spans


def tensor_names(n_layers: int) -> list[str]:
    return ["ids"] + [f"layers.{i}.{kv}" for i in range(n_layers) for kv in ("keys", "values")]


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON objects without duplicate keys: no two readers may disagree on a header."""
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def file_sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def read_chunk(path: Path, header_only: bool) -> tuple[bytes, int, os.stat_result]:
    """Read a chunk without following links or blocking on odd files: (bytes, file size, stat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if os.path.islink(path):
            raise BadChunk("is a symbolic link; refused, not followed") from None
        raise BadChunk(f"cannot be read ({e.strerror})") from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadChunk("is not a regular file")
        if not header_only:
            buf = f.read()
            return buf, len(buf), st
        buf = f.read(8)
        if len(buf) == 8:
            buf += f.read(min(int.from_bytes(buf, "little"), _MAX_HEADER))
        return buf, st.st_size, st


def _named(name: str, default: tuple[int, int]) -> tuple[int, int]:
    """(start, n_tokens) a chunk's file name says: `<start>-<n>-<parent>-<end>.safetensors`,
    or `chunk-<start>.safetensors` (a store from before the pool, which says no n)."""
    if name.startswith("chunk-"):
        return int(name[6:15]), default[1]
    return int(name[:9]), int(name[10:17])


def parse_chunk(buf: bytes, size: int, st: os.stat_result, name: str) -> Header:
    """Validate the safetensors framing and our metadata; `buf` holds at least the header."""
    hlen, header, meta = _framing(buf, size)
    entries = _entries(header, size - 8 - hlen)
    chunk, check, names = _kvrepl_meta(meta, entries, st, name)
    return chunk, check, 8 + hlen, [entries[k][2:] for k in names]  # spans in tensor_names order


def _framing(buf: bytes, size: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The safetensors frame: header length, the header's tensor entries, its metadata."""
    if size < 8:
        raise BadChunk(f"is only {size} bytes long")
    hlen = int.from_bytes(buf[:8], "little")
    if hlen > _MAX_HEADER or (size > 8 and buf[8:9] != b"{"):
        raise BadChunk("is not a safetensors file")
    if hlen > size - 8:
        raise BadChunk("is truncated (its header is cut off)")
    try:
        header = json.loads(buf[8 : 8 + hlen], object_pairs_hook=_unique)
    except ValueError:  # includes UnicodeDecodeError
        raise BadChunk("is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise BadChunk("is not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadChunk("has malformed metadata")
    return hlen, header, meta


def _entries(header: dict[str, Any], data: int) -> dict[str, tuple[str, list[int], int, int]]:
    """Each tensor entry checked (dtype, shape, span), the spans tiling exactly `data` bytes."""
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for key, e in header.items():
        try:
            code, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            ok = (
                code in _ITEMSIZE
                and isinstance(shape, list)
                and all(type(x) is int and x >= 0 for x in [*shape, a, b])
                and b - a == math.prod(shape) * _ITEMSIZE[code]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise BadChunk(f"has a malformed or unsupported tensor entry ({key[:40]})")
        entries[key] = (code, shape, a, b)
    end = 0
    for a, b in sorted((e[2], e[3]) for e in entries.values()):
        if a != end:
            raise BadChunk("has tensors whose data overlap or leave holes")
        end = b
    if data < end:
        raise BadChunk("is truncated")
    if data > end:
        raise BadChunk(f"has {data - end:,} bytes of trailing garbage after its data")
    return entries


def _kvrepl_meta(meta: dict[str, str], entries: dict[str, tuple[str, list[int], int, int]],
                 st: os.stat_result, name: str) -> tuple[Chunk, DataCheck, list[str]]:  # fmt: skip
    """kvrepl's metadata, checked against the file name and the tensors it describes."""
    if meta.get("format") != FORMAT:
        raise BadChunk("is not a kvrepl snapshot (no kvrepl metadata)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BadChunk(f"has an unknown format version ({(version or '')[:20]!r})")
    try:
        start, n, n_layers = (int(meta[k]) for k in ("start", "n_tokens", "n_layers"))
        fp, dname, ph = (meta[k] for k in ("fingerprint", "dtype", "prefix_hash"))
        if version == "1":
            check: DataCheck = ("sha256", meta["data_hash"])
        else:
            check = ("crc32", [int(x, 16) for x in meta["data_crc32"].split(",")])
    except (KeyError, ValueError):
        raise BadChunk("has incomplete metadata") from None
    if (start, n) != _named(name, (start, n)):
        raise BadChunk("does not match its file name")
    if n < 1 or n_layers < 1 or dname not in DTYPES:
        raise BadChunk("has invalid metadata (tokens, layers or dtype)")
    names = tensor_names(n_layers)
    shape = _kv_shape(entries, names, n, dname)
    if check[0] == "crc32" and len(check[1]) != len(names):
        raise BadChunk("has incomplete metadata")
    layout = (dname, n_layers, shape[1], shape[3])
    return Chunk(name, start, start + n, ph, fp, layout, file_sig(st)), check, names


def _kv_shape(entries: dict[str, tuple[str, list[int], int, int]], names: list[str], n: int,
              dname: str) -> tuple[int, ...]:  # fmt: skip
    """The one [1, heads, n, head_dim] shape and dtype every K/V tensor must have."""
    if set(entries) != set(names):
        raise BadChunk("has tensors that disagree with its metadata")
    if entries["ids"][:2] != ("I64", [n]):
        raise BadChunk("has a token count that disagrees with its tensors")
    shapes = {tuple(entries[k][1]) for k in names[1:]}
    codes = {entries[k][0] for k in names[1:]}
    if codes != {_ST_CODE[DTYPES[dname]]} or len(shapes) != 1:
        raise BadChunk("has tensors of mixed dtypes or shapes")
    shape = shapes.pop()
    if len(shape) != 4 or shape[0] != 1 or shape[2] != n:
        raise BadChunk("has a token count that disagrees with its tensors")
    return shape


_POOL: list[ThreadPoolExecutor] = []


def crc32s(buffers: Sequence[memoryview | bytes]) -> list[int]:
    """CRC32 of each buffer, two at a time (zlib releases the GIL): a flipped byte is caught at
    memory speed, where a sha256 of the data was half of a restore."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-crc"))
    return list(_POOL[0].map(zlib.crc32, buffers))


def ids_bytes(ids: Sequence[int]) -> bytes:
    return torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()


def layout_of(n: int, layers: Layers) -> Layout:
    """The layout of per-layer K/V over n tokens; ValueError when they are not one."""
    if not layers or layers[0][0].dim() != 4:
        raise ValueError("layers must be a non-empty list of [1, heads, n_tokens, head_dim] pairs")
    k0 = layers[0][0]
    shape = (1, k0.shape[1], n, k0.shape[3])
    for k, v in layers:
        if tuple(k.shape) != shape or tuple(v.shape) != shape or {k.dtype, v.dtype} != {k0.dtype}:
            raise ValueError(f"every K/V must have shape {shape} and dtype {k0.dtype}")
    dname = str(k0.dtype).removeprefix("torch.")
    if dname not in DTYPES:
        raise ValueError(f"unsupported K/V dtype {k0.dtype}")
    return (dname, len(layers), shape[1], shape[3])


def views(buf: bytes, start: int, spans: list[tuple[int, int]], c: Chunk) -> dict[str, Tensor]:
    """The chunk's tensors as views of its bytes, by name (spans in tensor_names order)."""
    dtype = DTYPES[c.layout[0]]
    shape = (1, c.layout[2], c.end - c.start, c.layout[3])
    out: dict[str, Tensor] = {}
    with warnings.catch_warnings():  # bytes are immutable: torch warns, and we never write
        warnings.simplefilter("ignore", UserWarning)
        for name, (a, b) in zip(tensor_names(c.layout[1]), spans, strict=True):
            t_dtype = torch.int64 if name == "ids" else dtype
            n = (b - a) // torch.empty(0, dtype=t_dtype).element_size()
            t = torch.frombuffer(buf, dtype=t_dtype, count=n, offset=start + a)
            out[name] = t if name == "ids" else t.view(shape)
    return out


def chunk_bytes(
    ids: Sequence[int],
    layers: Layers,
    start: int,
    end: int,
    fingerprint: str,
    offset: int = 0,
) -> tuple[str, bytes]:
    """Tokens [start, end) of `ids` and their K/V, from per-layer tensors that hold positions
    offset.. of ids, as one chunk file's name and bytes."""
    a, b = start - offset, end - offset
    tensors = {"ids": torch.tensor(list(ids[start:end]), dtype=torch.int64)}
    for i, (k, v) in enumerate(layers):
        tensors[f"layers.{i}.keys"] = k[:, :, a:b].detach().to("cpu").contiguous()
        tensors[f"layers.{i}.values"] = v[:, :, a:b].detach().to("cpu").contiguous()
    layout = layout_of(end - start, [(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"])
                                     for i in range(len(layers))])  # fmt: skip
    raw = ids_bytes(ids[:end])
    prefix, parent = hashlib.sha256(raw).hexdigest(), hashlib.sha256(raw[: 8 * start]).hexdigest()
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
        "prefix_hash": prefix,
        "data_crc32": ",".join(f"{c:08x}" for c in crcs),
    }
    name = f"{start:09d}-{end - start:07d}-{parent[:16]}-{prefix[:16]}.safetensors"
    return name, st_save(tensors, metadata=meta)


def fits(path: Path, start: int, end: int, fingerprint: str, layout: Layout) -> bool:
    """Whether a chunk's header reads (framing, size, metadata) as this model's K/V in this
    layout for tokens [start, end) (its data is checked when it is loaded)."""
    try:
        c = parse_chunk(*read_chunk(path, header_only=True), path.name)[0]
    except BadChunk:
        return False
    return (c.fingerprint, c.layout, c.start, c.end) == (fingerprint, layout, start, end)


def ids_of(path: Path) -> list[int] | None:
    """A chunk's ids, read without its K/V (not validated: a candidate, checked on load)."""
    try:
        head, size, st = read_chunk(path, header_only=True)
        c, _, data_start, spans = parse_chunk(head, size, st, path.name)
        a, b = spans[0]
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            raw = os.pread(fd, b - a, data_start + a)
        finally:
            os.close(fd)
    except (BadChunk, OSError):
        return None
    if len(raw) != b - a:
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).tolist()
