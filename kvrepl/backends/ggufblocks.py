"""Fields of GGUF's block formats that both backends read (the CPU's quant.py repacks every type;
the GPU's qweights.py keeps Q4_K's nibbles with its scales made per 32): float16 scales, planes
of packed bit fields, and the K-quants' 6-bit sub-block scales and mins. Pure numpy; never
reads a file."""

from __future__ import annotations

import numpy as np


def f16(b: np.ndarray) -> np.ndarray:
    """Bytes [..., 2] read as a float16, as float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def fields(x: np.ndarray, chunk: int, bits: int) -> np.ndarray:
    """Bytes [blocks, c * chunk] -> values [blocks, c * 8/bits, chunk]: each run of `chunk` bytes
    read as 8/bits planes of `bits`-bit values, lowest bits first (ggml's order for every block
    type here: e.g. a Q4_0 block's 16 bytes are weights 0-15 in the low nibbles, 16-31 high)."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    planes = (x.reshape(x.shape[0], -1, 1, chunk) >> shifts) & np.uint8((1 << bits) - 1)
    return planes.reshape(x.shape[0], -1, chunk)


def k_parts(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K blocks [blocks, bytes]: d and dmin, float32 [blocks, 1], and the 8 sub-blocks'
    6-bit scales and mins, uint8 [blocks, 8]."""
    d, dmin = f16(b[:, :2]), f16(b[:, 2:4])
    s = b[:, 4:16].reshape(-1, 3, 4)
    sd, sm, smd = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([sd & 0x3F, (smd & 0x0F) | ((sd >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([sm & 0x3F, (smd >> 4) | ((sm >> 2) & 0x30)], axis=-1)
    return d, dmin, sc, mn


def k_scale_min(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K blocks [blocks, bytes]: the 8 sub-blocks' scales d * sc and mins -(dmin * m)
    (6-bit sc, m), float32 [blocks, 8], computed as gguf-py computes them."""
    d, dmin, sc, mn = k_parts(b)
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
