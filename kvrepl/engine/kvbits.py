"""What the kv_bits setting means above the kernels: the name of each K/V mode in a model's
fingerprint (so 8-bit and 16-bit K/V never share a pool) and both fingerprints of a model, the
refusal of 8 bits where the K/V are not kvrepl's own kernels' to keep, and the line a resumed
session shows when its snapshot was saved with the other setting. The kernels' side is
backends/cpu (kv8.c). Never loads a model or reads a snapshot.
"""

from __future__ import annotations

from collections.abc import Callable

from kvrepl.errors import ModelError


def mode(bits: int) -> str:
    """The K/V part of a fast path's mode, as its fingerprint takes it (16: what it always was)."""
    return "int8-kv" if bits == 8 else "float16-kv"


def other(bits: int) -> int:
    return 8 if bits == 16 else 16


def refusal(where: str) -> str:
    """One line: 8-bit K/V asked of a model that `where` computes (transformers, the GPU)."""
    return (f"kv_bits 8: {where} keeps its own K/V, so 8-bit K/V (kvrepl's CPU kernels only) "
            "cannot be kept; start without --kv-bits 8 (or KVREPL_KV_BITS)")  # fmt: skip


def resumed_with_other(bits: int) -> str:
    """A session's snapshot holds the other kv_bits' K/V: it is not used (never mixed)."""
    return (
        f"snapshot: not used: it holds {other(bits)}-bit K/V and this run keeps {bits}-bit "
        f"(kv_bits {bits}); recomputing from the messages"
    )


def fingerprints(make: Callable[[str], str], bits: int) -> tuple[str, str]:
    """(this run's fingerprint, the one the other kv_bits gives), from `make(mode name)`."""
    return make(mode(bits)), make(mode(other(bits)))


def refuse_off_the_cpu_kernels(bits: int, dtype: str, device: str) -> None:
    """ModelError, before anything loads, where 8-bit K/V cannot be kept (another dtype than
    the CPU kernels' own, or a GPU)."""
    if bits == 8 and (dtype not in ("auto", "gguf") or device != "cpu"):
        where = "transformers" if dtype not in ("auto", "gguf") else "the GPU"
        raise ModelError(refusal(f"{where} (--dtype {dtype} on {device})"))
