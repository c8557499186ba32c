"""What a GGUF file holds, read without torch: its architecture and its tensors' names, types,
shapes and offsets, and whether the file is whole. The key/value section is skipped, not parsed
(gguf-py's reader parses every vocabulary string: 5 s for the embedded model), so checking a file
before the prompt costs milliseconds.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


class GGUFError(ValueError):
    """A file that is not a whole GGUF file; the message says what is wrong in one line."""


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip


_U64 = struct.Struct("<Q")


class _Reader:
    """Just enough of GGUF to find its tensors: the key/value section is skipped, not parsed
    (gguf-py's reader parses every vocabulary string: 5 s for this model)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def skip(self, vtype: int, want: bool = False) -> Any:
        if vtype == 8 and not want:
            n = self.take("<Q")
            self.pos += n
            return None
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[itype]) * count
            elif itype == 8:  # the vocabulary and merges: ~100k strings, in a tight loop
                buf, pos, length = self.buf, self.pos, _U64.unpack_from
                for _ in range(count):
                    pos += 8 + length(buf, pos)[0]
                self.pos = pos
            else:
                for _ in range(count):
                    self.skip(itype)
            return None
        return self.take(_SCALARS[vtype])


@functools.cache
def _gguf_constants() -> ModuleType:
    """gguf-py's constants module (the tensor types and their block sizes). Imported as
    `gguf.constants` it would run the package's __init__, which imports numpy and yaml (about
    40 ms before the prompt), so its file is loaded alone unless gguf is already imported."""
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    package = importlib.util.find_spec("gguf")
    if package is None or not package.submodule_search_locations:
        raise GGUFError("gguf-py is not installed (pip install gguf)")
    path = Path(list(package.submodule_search_locations)[0]) / "constants.py"
    spec = importlib.util.spec_from_file_location("kvrepl._gguf_constants", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@dataclass
class Head:
    arch: str
    tensors: dict[str, tuple[str, list[int], int]]  # name -> (type, dims, absolute offset)
    end: int  # where the last tensor's data ends


def read(buf: memoryview) -> Head:
    """The header of a GGUF file's bytes; GGUFError when they are not one."""
    gguf = _gguf_constants()

    r = _Reader(buf)
    try:
        if bytes(r.buf[:4]) != b"GGUF":
            raise GGUFError("not a GGUF file (it does not start with GGUF)")
        r.pos = 4
        r.take("<I")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, vtype = r.string(), r.take("<I")
            want = key in ("general.architecture", "general.alignment")
            value = r.skip(vtype, want)
            if want:
                meta[key] = value
        infos = []
        for _ in range(n_tensors):
            name, nd = r.string(), r.take("<I")
            dims = [r.take("<Q") for _ in range(nd)]
            infos.append((name, dims, gguf.GGMLQuantizationType(r.take("<I")), r.take("<Q")))
    except (ValueError, IndexError, KeyError, struct.error) as exc:
        if isinstance(exc, GGUFError):
            raise
        if isinstance(exc, struct.error) or r.pos > len(r.buf):  # read past the bytes given
            raise GGUFError(f"the file is truncated: its header runs past its {len(r.buf):,} "
                            "bytes (download it again)") from None  # fmt: skip
        raise GGUFError(f"its header is damaged near byte {r.pos:,}: not a GGUF file kvrepl "
                        "can read") from None  # fmt: skip
    align = int(meta.get("general.alignment") or 32)
    start = -(-r.pos // align) * align
    end = start
    for _, dims, qtype, off in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= int(d)
        end = max(end, start + off + n // block * size)
    tensors = {n: (t.name, dims, start + off) for n, dims, t, off in infos}
    return Head(str(meta.get("general.architecture", "")), tensors, end)


def check(path: Path) -> None:
    """GGUFError in one line when the file is not a whole GGUF file (not one, or truncated). Reads
    the header's bytes only (a few MB: the vocabulary), more if it is longer."""
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"not a GGUF file ({size} bytes)")
    want = 1 << 24
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(want)
            try:
                head = read(memoryview(buf))
                break
            except GGUFError:
                if len(buf) >= size:
                    raise
                want *= 4
    if head.end > size:
        raise GGUFError(f"the file is truncated: {size:,} of {head.end:,} bytes")
