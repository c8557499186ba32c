"""A transformers model's weights as the CPU fast path quantized them, kept in one safetensors file
so that the next load of the same weights reads them instead of quantizing again (gguf-py's
quantizer runs in numpy: seconds to minutes; reading the file, a fraction of a second).

Owns the file's layout (each `Packed` as `<name>.q` and `<name>.sc`, its format, shape, block
and the quantizer's version in the metadata), writing it atomically (a temporary file renamed
into place, so a reader sees the old file or the whole new one), and refusing one that is
damaged or from another quantizer version with one line, for the caller to quantize again.
Where the file lives and what names the weights it holds (the cache key) is the caller's
(engine/placement.py); what is quantized, and how, is gguf_model.py's and quant.py's.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from kvrepl.backends.cpu.quant import Packed

# Bumped when quant.py's packing of a quantized weight changes; gguf-py's version (its quantizer
# makes the blocks) is part of the version too.
PACKING_VERSION = "1"
FORMAT = "kvrepl-packed-weights"


def quantizer_version() -> str:
    try:
        gguf = version("gguf")
    except PackageNotFoundError:
        gguf = "unknown"
    return f"{PACKING_VERSION}/gguf-{gguf}"


def load(path: Path, qtype: str) -> tuple[dict[str, Packed], str | None]:
    """The weights kept in `path` by name, and None; or nothing and one line saying why the file
    was ignored (damaged, or another quantizer's). A missing file is nothing, silently."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return {}, None
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("qtype") != qtype:
                raise ValueError("not a file of kvrepl's converted weights")
            if meta.get("version") != quantizer_version():
                return {}, (f"the converted weights in {path.name} are from another quantizer "
                            "version: converting again")  # fmt: skip
            specs = json.loads(meta["weights"])
            return {name: _packed(name, spec, f) for name, spec in specs.items()}, None
    except OSError as exc:
        why = exc.strerror or "it cannot be read"
    except SafetensorError:
        why = "it is not a whole safetensors file"
    except (KeyError, TypeError, json.JSONDecodeError):
        why = "its list of weights cannot be read"
    except ValueError as exc:  # ours: a weight's CRC32 or shape, or not kvrepl's file
        why = str(exc)
    return {}, f"the converted weights in {path} are damaged ({why}): converting again"


def _packed(name: str, spec: list, f: Any) -> Packed:
    """One weight, checked against its CRC32s and its shape."""
    if not isinstance(spec, list) or len(spec) != 5:
        raise ValueError(f"{name}: its entry cannot be read")
    fmt, n, k, block, crcs = spec
    parts = [f.get_tensor(f"{name}.q")] + ([f.get_tensor(f"{name}.sc")] if len(crcs) > 1 else [])
    if [_crc(t) for t in parts] != crcs:
        raise ValueError(f"{name}: its bytes changed since they were written")
    q, sc = parts[0], parts[1] if len(parts) > 1 else None
    if (
        q.shape[0] != n
        or (sc is not None and sc.shape[0] != n)
        or (fmt in ("u4", "i8")) != (sc is not None)
    ):
        raise ValueError(f"{name} does not match its shape")
    return Packed(fmt, q, sc, n, k, block)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def save(path: Path, qtype: str, weights: dict[str, Packed]) -> str | None:
    """Write `weights` to `path` atomically; None, or one line when it could not be written (the
    model runs all the same, and quantizes again next time)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, list] = {}
    for name, p in weights.items():
        p = p.canonical()
        parts = [p.q] + ([p.sc] if p.sc is not None else [])
        for suffix, t in zip((".q", ".sc"), parts, strict=False):
            tensors[name + suffix] = t.contiguous()
        specs[name] = [p.fmt, p.n, p.k, p.block, [_crc(t) for t in parts]]
    meta = {"format": FORMAT, "qtype": qtype, "version": quantizer_version(),
            "weights": json.dumps(specs)}  # fmt: skip
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".packing-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # as a file written in place would be (mkstemp's is 0600)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # the disk full, the folder not writable
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        why = getattr(exc, "strerror", None) or "it could not be written"
        return f"the converted weights could not be kept in {path.parent} ({why})"
    return None
