"""The kernels' layout of a quantized weight (qmatmul.c reads it): rows in groups of 16, block
by block, each block's 16 rows as the 16 lanes of one register, for 4-bit (u4), 8-bit (i8),
6-bit (i6) and 5-bit (i5) values, IQ4's 4-bit indices to its levels (n4), and their scales.
Torch and numpy, the reference; given the kernels (`native.Kernels`), the way to the layout is
repack.c's, the same bytes ten and more times faster (tests compare them). quant.Packed.interleaved
and canonical use it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

GROUP = 16  # rows a kernel register holds, one a lane (qmatmul.c)


def _padded(n: int) -> int:
    return -(-n // GROUP) * GROUP


# Block b of a group of 16 rows, "lanes": vector t (t = 0..15) holds each row r's weights 2t and
# 2t + 1 as the 16-bit pair of lane r (int16 i = 2r + e is weight 2t + e), so one multiply-add
# of the vector with x's pair t broadcast adds those two products to every row's lane. u4: 256
# bytes, 4 runs of 32 words, run c's word i = V(4c) | V(4c+1) << 4 | V(4c+2) << 8 | V(4c+3) << 12;
# i8: 512 bytes, 8 runs of 32 words, run c's word i = V(2c) (low byte) | V(2c + 1) << 8.
def lanes(t: torch.Tensor, n: int, fmt: str, forward: bool, kernels: Any = None) -> torch.Tensor:
    """Rows one after the other <-> the lanes layout, in bytes throughout (a model's head is
    hundreds of MB: no wider copy than the weights' own values)."""
    u4 = fmt == "u4"
    if forward and kernels is not None:
        k = t.shape[1] * (2 if u4 else 1)
        return kernels.lanes(t.view(torch.uint8), n, k, fmt, nibbles=u4)
    per = 4 if u4 else 2  # vectors t in a run c
    g = _padded(n) // GROUP
    if forward:
        k = t.shape[1] * (2 if u4 else 1)
        nb = k // 32
        b = t.reshape(n, nb, -1).view(torch.uint8)
        v = torch.cat([b & 15, b >> 4], dim=-1) if u4 else b  # [n, nb, 32]: weight k's value
        if _padded(n) > n:
            v = torch.cat([v, v.new_zeros(_padded(n) - n, nb, 32)])
        # [g, r, b, c, s, e] -> [g, b, c, r, e, s]: word (2r + e) of run c, its part s
        v = v.reshape(g, GROUP, nb, 16 // per, per, 2).permute(0, 2, 3, 1, 5, 4)
        if u4:  # a word's low byte holds parts 0 and 1, its high byte parts 2 and 3
            v = v[..., 0::2] | (v[..., 1::2] << 4)
        return v.contiguous().reshape(_padded(n), -1)
    k = t.numel() // _padded(n) * (2 if u4 else 1)
    nb = k // 32
    w = t.reshape(g, nb, 16 // per, GROUP, 2, 2)  # [g, b, c, r, e, byte of the word]
    if u4:
        w = torch.stack([w & 15, w >> 4], dim=-1).reshape(g, nb, 4, GROUP, 2, 4)
    v = w.permute(0, 3, 1, 2, 5, 4).reshape(_padded(n), nb, 32)[:n]  # [n, b, k]
    if u4:
        return (v[..., :16] | (v[..., 16:] << 4)).contiguous().reshape(n, k // 2)
    return v.contiguous().view(torch.int8).reshape(n, k)


def _nibbles(u: torch.Tensor, n: int) -> torch.Tensor:
    """Values u [n, blocks, 32]: their low nibbles as u4's lanes layout [groups, blocks, 256]
    (i6's and i5's first 256 bytes a group and block; n4's whole)."""
    nb = u.shape[1]
    low = (u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)  # _pack_u4's order
    return lanes(low.to(torch.uint8).reshape(n, -1), n, "u4", True).reshape(-1, nb, 256)


def _unnibbles(t: torch.Tensor, n: int, nb: int) -> torch.Tensor:
    """`_nibbles`' bytes [groups, blocks, 256] -> the values' low nibbles [n, blocks, 32]."""
    b = lanes(t.reshape(_padded(n), -1), n, "u4", False).reshape(n, nb, 16)
    return torch.cat([b & 15, b >> 4], -1)


def _high(u: torch.Tensor, n: int) -> torch.Tensor:
    """Values u [n, blocks, 32]: u >> 4 as bytes, rows padded with zeros to the groups' rows."""
    hi = (u >> 4).to(torch.uint8)
    return torch.cat([hi, torch.zeros(_padded(n) - n, *hi.shape[1:], dtype=torch.uint8)])


# i6: values -32..31 as u = value + 32 in 384 bytes a group and block: u's low nibbles as u4's
# 256 (`lanes`), then its high 2 bits in 2 runs h of 32 words, word (2r + e) of run h holding
# H(8h + j) at bits 2j (the value of row r's weight 2(8h + j) + e), j = 0..7.
def six(q: torch.Tensor, n: int, kernels: Any = None) -> torch.Tensor:
    """int8 values [n, k] (-32..31) -> the i6 lanes layout [padded n, k * 3 / 4] bytes."""
    if kernels is not None:
        return kernels.lanes(q.view(torch.uint8), n, q.shape[1], "i6", off=32)
    u = (q.to(torch.int16) + 32).reshape(n, -1, 32)
    nb, g = u.shape[1], _padded(n) // GROUP
    low = _nibbles(u, n)
    hi = _high(u, n).reshape(g, GROUP, nb, 2, 8, 2).permute(0, 2, 3, 1, 5, 4)  # [g, b, h, r, e, j]
    bits = torch.stack([hi & 1, hi >> 1], -1).reshape(g, nb, 2, GROUP, 2, 16)  # bit 2j, 2j + 1
    words = np.packbits(bits.numpy(), axis=-1, bitorder="little")  # a word's 2 bytes
    return torch.cat([low, torch.from_numpy(words).reshape(g, nb, 128)], -1).reshape(_padded(n), -1)


def unsix(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The i6 lanes layout -> int8 values [n, k]."""
    g, nb = _padded(n) // GROUP, k // 32
    t = t.reshape(g, nb, 384)
    low = _unnibbles(t[..., :256], n, nb).to(torch.int16)
    w = t[..., 256:].reshape(g, nb, 2, GROUP, 2, 2).to(torch.int32)
    words = w[..., 0] | (w[..., 1] << 8)  # [g, nb, h, r, e]
    hi = (words.unsqueeze(-1) >> (2 * torch.arange(8, dtype=torch.int32))) & 3  # [.., e, j]
    hi = hi.permute(0, 3, 1, 2, 5, 4).reshape(_padded(n), nb, 32)[:n].to(torch.int16)
    return ((low | (hi << 4)) - 32).to(torch.int8).reshape(n, k)


def lane_scales(t: torch.Tensor, n: int, sub: int, forward: bool) -> torch.Tensor:
    """(scale, min) pairs [n, blocks of `block`, 2] (or the scales alone, [.., 1]) <-> per group
    and block of 32: for each of its `sub` parts, the 16 rows' scales, then their mins
    ([g, b, sub, 2 or 1, 16])."""
    nb, pair = t.shape[1] // sub, t.shape[2]
    if forward:
        t = torch.cat([t, t.new_zeros(_padded(n) - n, *t.shape[1:])])
        out = t.reshape(_padded(n) // GROUP, GROUP, nb, sub, pair).permute(0, 2, 3, 4, 1)
        return out.contiguous().reshape(_padded(n), nb * sub, pair)
    out = t.reshape(_padded(n) // GROUP, nb, sub, pair, GROUP).permute(0, 4, 1, 2, 3)
    return out.contiguous().reshape(_padded(n), nb * sub, pair)[:n]


# n4: IQ4's 4-bit indices into its 16 levels, in u4's lanes layout (the kernels look each up).
_CHUNK = 1 << 24  # values mapped at once (numpy widens indices to 8 bytes each)


def four(q: torch.Tensor, n: int, levels: torch.Tensor, kernels: Any = None) -> torch.Tensor | None:
    """int8 values [n, k], each one of the 16 `levels`, -> their indices in u4's lanes layout
    [padded n, k / 2]; None where a value is not a level (a table of 256 bytes, applied in
    chunks: no copy wider than the values over a head's hundreds of millions of them)."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[levels.numpy().view(np.uint8)] = np.arange(16, dtype=np.uint8)
    flat = q.contiguous().numpy().view(np.uint8).reshape(-1)
    if lut[flat[:4096]].max() == 255:  # Q8_0's values: no pass over the rest
        return None
    if kernels is not None:
        return kernels.lanes(q.view(torch.uint8), n, q.shape[1], "u4", lut=torch.from_numpy(lut))
    idx = np.empty_like(flat)
    for s in range(0, flat.size, _CHUNK):
        idx[s : s + _CHUNK] = lut[flat[s : s + _CHUNK]]
    if idx.max() == 255:
        return None
    return _nibbles(torch.from_numpy(idx).reshape(n, -1, 32), n).reshape(_padded(n), -1)


def unfour(t: torch.Tensor, n: int, k: int, levels: torch.Tensor) -> torch.Tensor:
    """`four`'s layout -> the int8 values [n, k]."""
    idx = _unnibbles(t, n, k // 32).reshape(-1).numpy()
    return torch.from_numpy(levels.numpy()[idx].reshape(n, k))


# i5: values in -16..15 (or 0..31) as u = value + off (off 16, or 0) in 320 bytes a group and
# block: u's low nibbles as u4's 256 (`lanes`), then its high bit in one run of 32 words, word
# (2r + e) holding H(t) at bit t (the value of row r's weight 2t + e), t = 0..15.
def five(q: torch.Tensor, n: int, off: int, kernels: Any = None) -> torch.Tensor:
    """int8 values [n, k] (-off..31 - off) -> the i5 lanes layout [padded n, k * 5 / 8] bytes."""
    if kernels is not None:
        return kernels.lanes(q.view(torch.uint8), n, q.shape[1], "i5", off=off)
    u = (q.to(torch.int16) + off).reshape(n, -1, 32)
    nb, g = u.shape[1], _padded(n) // GROUP
    hi = _high(u, n).reshape(g, GROUP, nb, 16, 2).permute(0, 2, 1, 4, 3)  # [g, b, r, e, t]
    words = np.packbits(hi.numpy(), axis=-1, bitorder="little")  # a word's 2 bytes, bit t = t
    hi = torch.from_numpy(words).reshape(g, nb, 64)
    return torch.cat([_nibbles(u, n), hi], -1).reshape(_padded(n), -1)


def unfive(t: torch.Tensor, n: int, k: int, off: int) -> torch.Tensor:
    """The i5 lanes layout -> int8 values [n, k]."""
    g, nb = _padded(n) // GROUP, k // 32
    t = t.reshape(g, nb, 320)
    low = _unnibbles(t[..., :256], n, nb).to(torch.int16)
    w = t[..., 256:].reshape(g, nb, GROUP, 2, 2).to(torch.int32)
    words = w[..., 0] | (w[..., 1] << 8)  # [g, nb, r, e]
    hi = (words.unsqueeze(-1) >> torch.arange(16, dtype=torch.int32)) & 1  # [g, nb, r, e, t]
    hi = hi.permute(0, 2, 1, 4, 3).reshape(_padded(n), nb, 32)[:n].to(torch.int16)
    return ((low | (hi << 4)) - off).to(torch.int8).reshape(n, k)


def narrowest(q: torch.Tensor, n: int, levels: torch.Tensor | None,
              kernels: Any = None) -> tuple[str, torch.Tensor | None]:  # fmt: skip
    """int8 values [n, k] in the fewest bits that hold them, in the kernels' layout: i5 (Q5_0,
    Q3_K), u5 (Q5_K, Q5_1, Q2_K), i6 (Q6_K), or, given IQ4's 16 `levels` (weights with no mins,
    blocks of 32), n4, each level's 4-bit index; else ("i8", None): bytes."""
    lo, hi = int(q.min()), int(q.max())
    if lo >= -16 and hi <= 15:
        return "i5", five(q, n, 16, kernels)
    if lo >= 0 and hi <= 31:
        return "u5", five(q, n, 0, kernels)
    if lo >= -32 and hi <= 31:
        return "i6", six(q, n, kernels)
    idx = four(q, n, levels, kernels) if levels is not None else None
    return ("n4", idx) if idx is not None else ("i8", None)
