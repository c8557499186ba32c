"""A GGUF file's quantized weights as the GPU path keeps them (`--gpu-weights gguf`): Q8_0, Q4_0,
Q4_1 and Q4_K blocks, with each block's scale (and minimum) split from its quants so that a
tile of either loads in one piece; the quants and the scales are the file's bytes, unchanged
(Q4's nibbles keep the file's order in a block: byte j holds element j low, j + 16 high), but
for Q4_K: its sub-blocks of 32 become Q4_1 blocks, their nibbles in that order and their scale
d * sc and minimum -(dmin * m) in float32 as gguf-py computes them (6 bits a weight, not 4.5;
the kernel's Q4_1 path then dequantizes exactly as gguf-py does).

The kernel (triton_ops.matmul) dequantizes a tile in registers as gguf-py dequantizes, in
float32 (q * d, Q4_1's + m: exact products, one rounding at most), rounds it to the activations'
dtype and multiplies as over a bf16 weight: the weights are bit for bit those transformers' GGUF
loader makes (checked on the embedded model), but on an H100 the result is not bit-identical to
the bf16 kernel's over them (relative differences in the last bits: bench/gpu_gguf.py), so its
K/V have their own fingerprint. Batch-invariant all the same. `dequantize` is also the torch
reference the CPU tests use.
Never imports Triton (CPU tests) and no other backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrepl.backends import ggufblocks, ggufinfo
from kvrepl.backends.describe import GGUF_NAMES, GGUF_PERMUTED, GGUF_TOP, Arch, gguf_qk_order

BLOCK = 32
# (weights, bytes) per block in the file; for the 32-weight blocks: the scale d (float16), Q4_1's
# minimum m (float16), then the quants
FORMATS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}
KINDS = {"Q8_0": 1, "Q4_0": 2, "Q4_1": 3, "Q4_K": 3}  # the kernel's QT (0: a plain weight)


@dataclass(frozen=True)
class QWeight:
    """An [n, k] weight in GGUF blocks: q (Q8_0: int8 [n, k]; Q4: uint8 [n, k / 2]), d (float16
    [n, k / 32]; Q4_K float32) and m (Q4_1: float16 [n, k / 32]; Q4_K float32; else None)."""

    qtype: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @property
    def kind(self) -> int:
        return KINDS[self.qtype]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)

    def to(self, device: Any) -> QWeight:
        m = None if self.m is None else self.m.to(device)
        return replace(self, q=self.q.to(device), d=self.d.to(device), m=m)

    def rows(self, order: Any) -> QWeight:
        """These rows in this order (transformers' Q/K row order, say)."""
        idx = torch.as_tensor(np.asarray(order), dtype=torch.long, device=self.q.device)
        m = None if self.m is None else self.m[idx]
        return replace(self, q=self.q[idx], d=self.d[idx], m=m)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as gguf-py dequantizes it (float32), then in `dtype`."""
        n, k = self.shape
        d = self.d.float().repeat_interleave(BLOCK, 1)
        if self.qtype == "Q8_0":
            return (self.q.float() * d).to(dtype)
        b = self.q.view(n, k // BLOCK, BLOCK // 2)
        q = torch.cat([b & 15, b >> 4], -1).reshape(n, k).float()
        if self.qtype == "Q4_0":
            return ((q - 8.0) * d).to(dtype)
        return (q * d + self.m.float().repeat_interleave(BLOCK, 1)).to(dtype)


def from_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> QWeight:
    """An [n, k] weight from a GGUF tensor's bytes (its blocks, row by row)."""
    size = FORMATS[qtype][1]
    if qtype == "Q4_K":
        return _q4_k(np.asarray(raw, dtype=np.uint8).reshape(-1, size), n, k)
    has_min = qtype == "Q4_1"
    b = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size))
    d = torch.from_numpy(b[..., :2].copy().view(np.float16).reshape(n, k // BLOCK))
    m = torch.from_numpy(b[..., 2:4].copy().view(np.float16).reshape(n, k // BLOCK)) \
        if has_min else None  # fmt: skip
    qs = b[..., 4 if has_min else 2 :].reshape(n, -1)
    q = torch.from_numpy(qs.view(np.int8) if qtype == "Q8_0" else qs.copy())
    return QWeight(qtype, q.contiguous(), d, m)


def _q4_k(b: np.ndarray, n: int, k: int) -> QWeight:
    """Q4_K super-blocks [n * k / 256, 144] as Q4_1 blocks of 32 (float32 scales and mins)."""
    scale, minimum = ggufblocks.k_scale_min(b)
    v = ggufblocks.fields(b[:, 16:144], 32, 4).reshape(n, k // BLOCK, 2, BLOCK // 2)
    q = torch.from_numpy(np.ascontiguousarray(v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2))
    d = torch.from_numpy(np.ascontiguousarray(scale.reshape(n, k // BLOCK)))
    m = torch.from_numpy(np.ascontiguousarray(minimum.reshape(n, k // BLOCK)))
    return QWeight("Q4_K", q, d, m)


def joined(parts: list[QWeight | None]) -> QWeight | None:
    """Weights stacked by rows (Q, K and V; gate and up), or None unless all are of one type."""
    if any(p is None for p in parts) or len({p.qtype for p in parts}) != 1:  # type: ignore[union-attr]
        return None
    ps: list[QWeight] = parts  # type: ignore[assignment]
    m = None if ps[0].m is None else torch.cat([p.m for p in ps])  # type: ignore[misc]
    return QWeight(ps[0].qtype, torch.cat([p.q for p in ps]), torch.cat([p.d for p in ps]), m)


def dense(w: Any, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain matrix (the torch ops' reference): a QWeight dequantized."""
    return w.dequantize(dtype) if isinstance(w, QWeight) else w


class GGUFBlocks:
    """The Q8_0/Q4_0/Q4_1/Q4_K matrices of one GGUF file, by role, on a device."""

    def __init__(self, path: Path, arch: Arch, device: Any) -> None:
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        head = ggufinfo.read(memoryview(self.data))
        self.file_arch, self.tensors = head.arch, head.tensors
        self.arch, self.device = arch, device

    def tensor(self, name: str) -> QWeight | None:
        """The matrix of that name on the device, or None: absent, or another type."""
        if name not in self.tensors or self.tensors[name][0] not in FORMATS:
            return None
        qtype, dims, off = self.tensors[name]
        k, n = int(dims[0]), int(np.prod(dims[1:]))
        weights, size = FORMATS[qtype]
        if k % weights:
            return None
        raw = self.data[off : off + n * k // weights * size]
        return from_blocks(raw, qtype, n, k).to(self.device)

    def layer(self, i: int) -> dict[str, QWeight | None]:
        """Layer i's qkv, o, gate_up and down as the GPU path joins them (None: not kept)."""
        a, b = self.arch, f"blk.{i}."
        get = {r: self.tensor(b + GGUF_NAMES[r]) for r in ("q", "k", "v", "gate", "up")}
        if self.file_arch in GGUF_PERMUTED:
            for role, heads in (("q", a.n_heads), ("k", a.n_kv)):
                w = get[role]
                get[role] = None if w is None else w.rows(gguf_qk_order(w.shape[0], heads))
        return {"qkv": joined([get["q"], get["k"], get["v"]]),
                "gate_up": joined([get["gate"], get["up"]]),
                "o": self.tensor(b + GGUF_NAMES["o"]),
                "down": self.tensor(b + GGUF_NAMES["down"])}  # fmt: skip

    def lm_head(self) -> QWeight | None:
        if GGUF_TOP["lm_head"] in self.tensors:
            return self.tensor(GGUF_TOP["lm_head"])
        return self.tensor(GGUF_TOP["embed"])  # tied
