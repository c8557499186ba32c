"""Quantized weights: GGUF's block formats repacked, exactly, into the kernels' formats.

Owns the byte layouts of the GGUF types the CPU fast path runs and their conversion into `Packed`
weights: 4-bit values with a float (scale, min) per 32 (`u4`: Q4_0, Q4_1, Q4_K), 8-bit values
with a float (scale, min) per 32 (`i8`: Q5_0, Q5_1, Q5_K, Q8_0, IQ4_NL, IQ4_XS, the IQ4 types as
their table's int8 levels) or per 16 (`i8`: Q2_K, Q3_K, Q6_K), or plain `f16` (F16) / `f32`
(BF16, F32). So the common downloads' mixes (Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0,
IQ4_NL, IQ4_XS) run; the other IQ types (grids) are refused. Every conversion is exact:
`Packed.dequantize()` equals gguf-py's dequantization (what transformers loads) bit for bit
(Q4_0: up to the sign of a zero), so the fast path computes with the file's own weights.
In the kernels' layout (`Packed.interleaved`, lanes.py) the K-quants' and IQ4_XS's scales are
int8 times a float per 256 weights, and 8-bit values within -32..31 take 6 bits (`i6`): on a
Q4_K_M file a quarter fewer bytes a token, the same products. Never runs a kernel and never
reads a file (gguf_model.py does)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvrepl.backends.cpu.lanes import GROUP
from kvrepl.backends.cpu.lanes import lane_scales as _lane_scales
from kvrepl.backends.cpu.lanes import lanes as _lanes
from kvrepl.backends.cpu.lanes import narrowest as _narrowest
from kvrepl.backends.cpu.lanes import unfive as _unfive
from kvrepl.backends.cpu.lanes import unfour as _unfour
from kvrepl.backends.cpu.lanes import unsix as _unsix
from kvrepl.backends.ggufblocks import f16 as _f16
from kvrepl.backends.ggufblocks import fields as _fields
from kvrepl.backends.ggufblocks import k_parts as _k_parts

QK_K = 256
# GGUF type name -> (block size in weights, bytes per block)
LAYOUT = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
    "F16": (1, 2),
    "BF16": (1, 2),
    "F32": (1, 4),
}


class QuantError(ValueError):
    """A tensor the fast path cannot take (its type or shape); the message says which."""


@dataclass
class Packed:
    """One weight matrix [n, k] in a kernel format. `q`: u4 uint8 [n, k/2] (per 32 weights, 16
    bytes: low nibbles are weights 0-15, high nibbles 16-31), i8 int8 [n, k], f16 float16 or f32
    float32 [n, k]; `sc`: float32 [n, k/block, 2] (scale, min) for u4 and i8 (float16 in
    interleaved rows where each value is one exactly)."""

    fmt: str
    q: torch.Tensor
    sc: torch.Tensor | None
    n: int
    k: int
    block: int = 32
    group: int = 1  # rows interleaved block by block in groups of this many (see interleaved)
    # rows as they are: where every (scale, min) is a small integer times its 256-weight
    # superblock's float (the K-quants, IQ4_XS), (dd float32 [n, k/256, 2], small int8
    # [n, k/block, 2]) with sc == dd * small exactly; interleaved, `sc` is then `small` in the
    # lanes layout and `dd` the floats, [groups, k/256, 2, 16] (a quarter of the bytes)
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    dd: torch.Tensor | None = None
    # interleaved: 1 the mins are kept (some min is not 0), 0 none are, 2 each is -8 times its
    # scale (Q4_0's values as 0..15), which the kernels make from the scale
    mins: int | None = None
    # sc was made as dd * small from `factors` (the packers, canonical): the same floats by
    # construction, which interleaved() otherwise checks before keeping the factors alone
    expanded: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.sc, self.dd)
                   if t is not None)  # fmt: skip

    def interleaved(self, group: int = GROUP, compact: bool = True, kernels: Any = None) -> Packed:
        """The kernels' layout of a u4 or i8 weight: rows in groups of 16, block by block, each
        block's 16 rows as the 16 lanes of one register (`_lanes`), rows padded with zeros to a
        multiple of 16; scales and mins likewise (float16 where every one is exactly one), the
        mins only where one is not 0 and is not -8 times its scale (Q8_0, Q6_K: none; Q4_0:
        each -8 times its scale). Others stay as they are. `kernels` (native.Kernels): the
        layout made by repack.c, the same bytes as lanes.py's torch, many times faster."""
        if group not in (1, GROUP):
            raise ValueError(f"rows interleave in groups of {GROUP} (or 1: as they are)")
        if group == 1 or self.fmt not in ("u4", "i8") or self.group != 1 or self.sc is None:
            return self
        mins = int(bool(self.sc[..., 1].ne(0).any()))
        fmt, q = self.fmt, None
        if compact and fmt == "i8":
            levels = _IQ4_LEVELS if not mins and self.block == 32 else None
            fmt, q = _narrowest(self.q, self.n, levels, kernels)
        if q is None:
            q = _lanes(self.q, self.n, self.fmt, True, kernels)
        sub = 32 // self.block
        if mins and fmt == "u4" and self.factors is None and torch.equal(
            (self.sc[..., 0] * -8.0).view(torch.int32), self.sc[..., 1].view(torch.int32)
        ):  # Q4_0: (q - 8) * d as q * d + (-8 * d); the kernels make the min, the same float
            mins = 2
        kept = 2 if mins == 1 else 1  # (scale, min), or the scale alone
        if compact and self.factors is not None and (self.expanded or torch.equal(
            _expand(*self.factors, self.block).view(torch.int32), self.sc.view(torch.int32)
        )):  # the kernels rebuild each scale as dd * small, the same float (an exact product)
            dd, small = (f[..., :kept].contiguous() for f in self.factors)
            sc, dd = _lane_scales(small, self.n, sub, True), _lane_scales(dd, self.n, 1, True)
            return Packed(fmt, q, sc, self.n, self.k, self.block, group, dd=dd, mins=mins)
        sc = _lane_scales(self.sc[..., :kept].contiguous(), self.n, sub, True)
        half = sc.half()
        if torch.equal(half.float().view(torch.int32), sc.view(torch.int32)):
            sc = half  # every scale and min is a float16 (Q4_0, Q4_1, Q8_0): 2 bytes each less
        return Packed(fmt, q, sc, self.n, self.k, self.block, group, mins=mins)

    def canonical(self) -> Packed:
        """Rows one after the other again (the padding dropped)."""
        if self.group == 1:
            return self
        fmt = "i8" if self.fmt in ("i6", "n4", "i5", "u5") else self.fmt
        if self.fmt in ("i5", "u5"):
            q = _unfive(self.q, self.n, self.k, 16 if self.fmt == "i5" else 0)
        elif self.fmt == "i6":
            q = _unsix(self.q, self.n, self.k)
        elif self.fmt == "n4":
            q = _unfour(self.q, self.n, self.k, _IQ4_LEVELS)
        else:
            q = _lanes(self.q, self.n, fmt, False)
        sub = 32 // self.block
        if self.dd is not None:
            small = _lane_scales(self.sc, self.n, sub, False)
            dd = _lane_scales(self.dd, self.n, 1, False)
            if not self.mins:  # the mins, all 0 (-0.0 times 0, as factors() writes them)
                small = torch.cat([small, torch.zeros_like(small)], -1)
                dd = torch.cat([dd, torch.full_like(dd, -0.0)], -1)
            factors = (dd, small)
            return Packed(fmt, q, _expand(dd, small, self.block), self.n, self.k, self.block,
                          factors=factors, expanded=True)  # fmt: skip
        sc = _lane_scales(self.sc.float(), self.n, sub, False)
        if self.mins != 1:
            sc = torch.cat([sc, sc * -8.0 if self.mins == 2 else torch.zeros_like(sc)], -1)
        return Packed(fmt, q, sc, self.n, self.k, self.block)

    def dequantize(self) -> torch.Tensor:
        """The float32 weights (for checks and the reference path)."""
        if self.group != 1:
            return self.canonical().dequantize()
        if self.fmt in ("f16", "f32"):
            return self.q.float()
        if self.fmt == "u4":
            b = self.q.reshape(self.n, -1, 16)
            q = torch.cat([b & 15, b >> 4], dim=-1).reshape(self.n, -1, 32).float()
        else:
            q = self.q.reshape(self.n, -1, self.block).float()
        s, m = self.sc[..., 0:1], self.sc[..., 1:2]
        return torch.addcmul(m, q, s).reshape(self.n, self.k)  # q * s + m, one rounding

    def rows(self, order: np.ndarray | torch.Tensor) -> Packed:
        """These rows, in this order (transformers' Q/K permutation; a selection for checks)."""
        if self.group != 1:
            return self.canonical().rows(order)
        idx = torch.as_tensor(order, dtype=torch.long)
        sc = self.sc[idx].contiguous() if self.sc is not None else None
        f = self.factors
        factors = (f[0][idx].contiguous(), f[1][idx].contiguous()) if f is not None else None
        return Packed(self.fmt, self.q[idx].contiguous(), sc, len(idx), self.k, self.block,
                      factors=factors, expanded=self.expanded)  # fmt: skip


def _expand(dd: torch.Tensor, small: torch.Tensor, block: int) -> torch.Tensor:
    """(scale, min) pairs [n, k/block, 2] from their superblocks' floats and small integers."""
    return dd.repeat_interleave(QK_K // block, dim=1) * small.float()


def factors(d: np.ndarray, dmin: np.ndarray | None, sc: np.ndarray, mn: np.ndarray | None, n: int,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Packed.factors from a superblock's d (and dmin: its mins are -(dmin * mn)) and its
    sub-blocks' integer scales sc (and mins mn), [blocks of 256, ...]."""
    d = d.reshape(-1).astype(np.float32)
    neg = np.full_like(d, -0.0) if dmin is None else -dmin.reshape(-1).astype(np.float32)
    mn = np.zeros_like(sc) if mn is None else mn
    dd = torch.from_numpy(np.ascontiguousarray(np.stack([d, neg], -1).reshape(n, k // QK_K, 2)))
    small = np.stack([sc.astype(np.int8), mn.astype(np.int8)], -1).reshape(n, -1, 2)
    return dd, torch.from_numpy(np.ascontiguousarray(small))


def _pack_u4(q: np.ndarray, n: int, k: int) -> torch.Tensor:
    """Values 0..15 [n, k] -> 16 bytes per 32: low nibble = weight j, high = weight j + 16."""
    q = q.reshape(n, k // 32, 2, 16).astype(np.uint8)
    return torch.from_numpy((q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).copy())


def _scales(scale: np.ndarray, minimum: np.ndarray | None, n: int) -> torch.Tensor:
    """(scale, min) pairs [n, blocks, 2]. No minimum: -0.0, which adds nothing and keeps the sign
    of a zero q * scale as gguf-py's product has it (the kernels take it as no min)."""
    scale = scale.astype(np.float32).reshape(-1)
    minimum = np.full_like(scale, -0.0) if minimum is None else minimum.astype(np.float32)
    minimum = minimum.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(np.stack([scale, minimum], -1).reshape(n, -1, 2)))


def _int8(q: np.ndarray | torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Values [n, k] as a tensor: one already (repack.c's values, u4's nibble pairs) as it is,
    numpy's as int8 (no copy where they are int8 and contiguous already, as Q8_0's bytes are)."""
    if isinstance(q, torch.Tensor):
        return q
    return torch.from_numpy(np.ascontiguousarray(q.astype(np.int8, copy=False).reshape(n, k)))


def _i8(q: np.ndarray | torch.Tensor, scale: np.ndarray, minimum: np.ndarray | None, n: int,
        k: int, block: int = 32) -> Packed:  # fmt: skip
    return Packed("i8", _int8(q, n, k), _scales(scale, minimum, n), n, k, block)


def _factored(q: np.ndarray | torch.Tensor, fac: tuple[torch.Tensor, torch.Tensor], n: int,
              k: int, block: int = 32, fmt: str = "i8") -> Packed:  # fmt: skip
    """A K-quant's or IQ4_XS's Packed, its (scale, min) pairs made from their factors in torch
    (each dd * small: gguf-py's float32 products, the same bits; the tests compare the weights
    with gguf-py's), and so marked: interleaved() need not check that they are such products."""
    return Packed(fmt, _int8(q, n, k), _expand(*fac, block), n, k, block, factors=fac,
                  expanded=True)


def _values(b: np.ndarray, qtype: str, n: int, k: int, kernels: Any,
            numpy_values: Callable[[], np.ndarray]) -> np.ndarray | torch.Tensor:  # fmt: skip
    """A tensor's integer values: repack.c's where the kernels are given (the same values, many
    times faster), else numpy's (the reference)."""
    return kernels.gguf_values(b, qtype, n, k) if kernels is not None else numpy_values()


def pack(raw: np.ndarray, qtype: str, n: int, k: int, kernels: Any = None) -> Packed:
    """GGUF tensor bytes (rows of blocks, as stored) -> Packed, exactly. `kernels`
    (native.Kernels): the values read by repack.c, else by numpy."""
    if qtype not in LAYOUT:
        raise QuantError(f"tensor type {qtype} is not supported by the fast path")
    bs, nbytes = LAYOUT[qtype]
    if k % 32 or k % bs:
        raise QuantError(f"a {qtype} row of {k} weights does not split into blocks of {bs}")
    raw = np.ascontiguousarray(raw).reshape(-1)
    if qtype in ("F16", "BF16", "F32"):
        if qtype == "F16":
            return Packed(
                "f16", torch.from_numpy(raw.view(np.float16).reshape(n, k).copy()), None, n, k
            )
        if qtype == "BF16":
            f = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            f = raw.view(np.float32)
        return Packed("f32", torch.from_numpy(f.reshape(n, k).copy()), None, n, k)
    blocks = raw.reshape(-1, nbytes)
    return _PACKERS[qtype](blocks, n, k, kernels)


# Every packer below keeps gguf-py's float32 scale products (d * sub-block scale, computed the
# same way) and its integer values; q * scale is then exact in float32 (at most 11 + 7 + 5
# significant bits), so the one rounding left, of adding the min, is gguf-py's own.


def _u4_bytes(b: np.ndarray, n: int, k: int) -> torch.Tensor:
    """Q4_0's and Q4_1's 16 bytes of nibbles per 32 weights: already u4's nibble pairs (weight j
    low, j + 16 high), what _pack_u4 of their fields would give."""
    return torch.from_numpy(np.ascontiguousarray(b).reshape(n, k // 2))


def _q4_0(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d = _f16(b[:, :2]).reshape(-1)
    return Packed("u4", _u4_bytes(b[:, 2:18], n, k), _scales(d, -8.0 * d, n), n, k)


def _q4_1(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return Packed("u4", _u4_bytes(b[:, 4:20], n, k), _scales(d, m, n), n, k)


def _q5(b: np.ndarray, n: int, k: int, kernels: Any, with_min: bool) -> Packed:
    d = _f16(b[:, :2])
    off = 4 if with_min else 2
    m = _f16(b[:, 2:4]) if with_min else None

    def values() -> np.ndarray:
        qh = np.ascontiguousarray(b[:, off : off + 4]).view(np.uint32)  # bit j: weight j's 5th
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = _fields(b[:, off + 4 : off + 20], 16, 4).reshape(-1, 32) | (high << 4)
        return q.astype(np.int16) - (0 if with_min else 16)

    return _i8(_values(b, "Q5_1" if with_min else "Q5_0", n, k, kernels, values), d, m, n, k)


def _q8_0(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d = _f16(b[:, :2])
    return _i8(np.ascontiguousarray(b[:, 2:34]).view(np.int8), d, None, n, k)


def _q4_k(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d, dmin, sc, mn = _k_parts(b)

    def values() -> torch.Tensor:  # sub-block j: low (j even) or high nibbles of 32 bytes
        return _pack_u4(_fields(b[:, 16:144], 32, 4), n, k)

    q = _values(b, "Q4_K", n, k, kernels, values)
    return _factored(q, factors(d, dmin, sc, mn, n, k), n, k, fmt="u4")


def _q5_k(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d, dmin, sc, mn = _k_parts(b)

    def values() -> np.ndarray:
        return _fields(b[:, 48:176], 32, 4) | (_fields(b[:, 16:48], 32, 1) << 4)

    return _factored(_values(b, "Q5_K", n, k, kernels, values), factors(d, dmin, sc, mn, n, k),
                     n, k)  # fmt: skip


def _q6_k(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8)
    d = _f16(b[:, 208:210])

    def values() -> np.ndarray:
        lo = _fields(b[:, :128], 64, 4).reshape(-1, 8, 32)
        return (lo | (_fields(b[:, 128:192], 32, 2) << 4)).astype(np.int16) - 32

    q = _values(b, "Q6_K", n, k, kernels, values)
    return _factored(q, factors(d, None, scales, None, n, k), n, k, 16)


def _q3_k(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d = _f16(b[:, 108:110])
    low, high = _fields(b[:, 96:104], 8, 4), _fields(b[:, 104:108], 4, 2)
    scales = (low.reshape(-1, 16) | (high.reshape(-1, 16) << 4)).astype(np.int8) - 32

    def values() -> np.ndarray:  # hmask bit set: no offset
        ql = _fields(b[:, 32:96], 32, 2).astype(np.int16)
        return ql - 4 * (1 - _fields(b[:, :32], 32, 1).astype(np.int16))

    q = _values(b, "Q3_K", n, k, kernels, values)
    return _factored(q, factors(d, None, scales, None, n, k), n, k, 16)


def _q2_k(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    sc, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _values(b, "Q2_K", n, k, kernels, lambda: _fields(b[:, 16:80], 32, 2))
    return _factored(q, factors(d, dmin, sc & 0xF, sc >> 4, n, k), n, k, 16)


IQ4NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)  # ggml's kvalues_iq4nl: the 16 levels a 4-bit IQ4 index stands for
_IQ4_LEVELS = torch.from_numpy(IQ4NL_VALUES)  # the kernels' n4 (qmatmul.c's IQ4NL) looks them up


def _iq4_nl(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    q = _values(b, "IQ4_NL", n, k, kernels, lambda: IQ4NL_VALUES[_fields(b[:, 2:18], 16, 4)])
    return _i8(q, _f16(b[:, :2]), None, n, k)


def _iq4_xs(b: np.ndarray, n: int, k: int, kernels: Any = None) -> Packed:
    d = _f16(b[:, :2])
    low, high = _fields(b[:, 4:8], 1, 4), _fields(b[:, 2:4], 1, 2)  # high: 2 bits j of a uint16
    ls = (low | (high << 4)).reshape(-1, 8).astype(np.int8) - 32
    q = _values(b, "IQ4_XS", n, k, kernels, lambda: IQ4NL_VALUES[_fields(b[:, 8:136], 16, 4)])
    return _factored(q, factors(d, None, ls, None, n, k), n, k)


_PACKERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": lambda b, n, k, kernels: _q5(b, n, k, kernels, False),
    "Q5_1": lambda b, n, k, kernels: _q5(b, n, k, kernels, True),
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def quantize(w: torch.Tensor, qtype: str) -> Packed:
    """Quantize float weights [n, k] the way llama.cpp does (gguf-py's reference quantizers),
    then pack: for models that are not GGUF files, and for tests."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    n, k = w.shape
    raw = gguf_quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType[qtype])
    return pack(raw, qtype, n, k)
