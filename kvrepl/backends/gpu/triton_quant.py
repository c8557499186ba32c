"""The GPU matmul's tiles of GGUF blocks (qweights.py): a tile of a Q8_0, Q4_0, Q4_1 (and Q4_K, kept
as Q4_1 blocks) weight dequantized in registers to the values gguf-py gives, loaded by blocks or
element by element. Owns the tile loaders; not the matmul that calls them (triton_ops.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def activations(ptrs, ok, CV: tl.constexpr):
    """The matmul's tile of x; float16 where the weights' tiles are (CV 2: QFLOAT "f16")."""
    a = tl.load(ptrs, mask=ok, other=0.0)
    if CV == 2:
        a = a.to(tl.float16)
    return a


@triton.jit
def weights(w, wd, wm, rn, k0, rk, swn, sdn, ok, dtype: tl.constexpr, QT: tl.constexpr,
             Q3: tl.constexpr, CV: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """The weight tile [rows rn, columns k0 + rk] in the activations' dtype. QT 1 (Q8_0), 2
    (Q4_0), 3 (Q4_1): dequantized as gguf-py does, in float32 (q * d, + m; float16 with CV 2),
    then rounded once; Q3: loaded by blocks (contiguous loads, then put in order), else element
    by element."""
    kk = k0 + rk
    if QT == 0:
        t = tl.load(w + rn[:, None] * swn + kk[None, :], mask=ok[:, None], other=0.0)
    elif Q3:
        t = _blocks(w, wd, wm, rn, k0, swn, sdn, ok, dtype, QT, CV, BK)
    else:
        t = _elements(w, wd, wm, rn, kk, swn, sdn, ok, dtype, QT, CV)
    return t


@triton.jit
def _elements(w, wd, wm, rn, kk, swn, sdn, ok, dtype: tl.constexpr, QT: tl.constexpr,
              CV: tl.constexpr):  # fmt: skip
    """weights' tile loaded element by element (each its byte and its block's scale)."""
    ct = tl.float16 if CV == 2 else tl.float32  # float16: the scales are (QFLOAT "f16")
    d = tl.load(wd + rn[:, None] * sdn + (kk // 32)[None, :], mask=ok[:, None], other=0.0)
    if QT == 1:
        q = tl.load(w + rn[:, None] * swn + kk[None, :], mask=ok[:, None], other=0)
        v = _float(q, 1, CV) * d.to(ct)
    else:  # byte j of a block: element j in its low nibble, j + 16 in its high one
        at = (kk // 32) * 16 + kk % 16
        byte = tl.load(w + rn[:, None] * swn + at[None, :], mask=ok[:, None], other=0)
        q = (byte >> ((kk % 32) // 16 * 4).to(tl.uint8)[None, :]) & 15
        if QT == 2:
            v = _float(q, 2, CV) * d.to(ct)
        else:
            mn = tl.load(wm + rn[:, None] * sdn + (kk // 32)[None, :], mask=ok[:, None], other=0.0)
            v = _float(q, 3, CV) * d.to(ct) + mn.to(ct)
    return v.to(dtype)


@triton.jit
def _float(q, QT: tl.constexpr, CV: tl.constexpr):
    """A block's quants as floats, exactly: Q8_0's int8 (QT 1), Q4_0's nibble - 8 (QT 2), Q4_1's
    nibble (QT 3). Made by their bits, not converted: 0x4B000000 | u is the float32 2^23 + u
    (u < 2^23), 0x6400 | u the float16 1024 + u (u < 1024), so one OR and one exact subtraction
    replace an int -> float conversion, which runs at an eighth of the float rate on a GPU;
    Q8_0's q is first made 0..255 (q + 128). CV (QFLOAT): 0 float32 by the bits; 1 float32
    converted (the benchmarks' baseline; the same floats); 2 float16 by the bits."""
    if CV == 1:
        r = q.to(tl.float32)
        if QT == 2:
            r = r - 8.0
    else:
        if QT == 1:
            u = q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 128
            off: tl.constexpr = 128.0
        elif QT == 2:
            u = q.to(tl.int32)
            off: tl.constexpr = 8.0
        else:
            u = q.to(tl.int32)
            off: tl.constexpr = 0.0
        if CV == 2:  # off a constexpr: the subtraction stays float16
            r = (u.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + off)
        else:
            r = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + off)
    return r


@triton.jit
def _blocks(w, wd, wm, rn, k0, swn, sdn, ok, dtype: tl.constexpr, QT: tl.constexpr,
            CV: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """weights' tile loaded as [rows, blocks, 32] (Q4: [rows, blocks, 16] bytes, each low
    nibble before every high one), scaled per block, then laid out as [rows, BK]."""
    NB: tl.constexpr = BK // 32
    r3 = rn[:, None, None]
    ok3 = ok[:, None, None]
    bi = (k0 // 32 + tl.arange(0, NB))[None, :, None]
    ct = tl.float16 if CV == 2 else tl.float32  # float16: the scales are (QFLOAT "f16")
    d = tl.load(wd + r3 * sdn + bi, mask=ok3, other=0.0).to(ct)
    if QT == 1:
        q = tl.load(w + r3 * swn + bi * 32 + tl.arange(0, 32)[None, None, :], mask=ok3, other=0)
        v = tl.reshape(_float(q, 1, CV) * d, (rn.shape[0], BK))
    else:
        byte = tl.load(w + r3 * swn + bi * 16 + tl.arange(0, 16)[None, None, :], mask=ok3,
                       other=0)  # fmt: skip
        q = _float(tl.permute(tl.join(byte & 15, byte >> 4), (0, 1, 3, 2)), QT, CV)
        d4 = d[:, :, :, None]
        if QT == 2:
            v4 = q * d4
        else:
            mn = tl.load(wm + r3 * sdn + bi, mask=ok3, other=0.0).to(ct)
            v4 = q * d4 + mn[:, :, :, None]
        v = tl.reshape(v4, (rn.shape[0], BK))
    return v.to(dtype)
