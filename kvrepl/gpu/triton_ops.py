"""The GPU path's kernels, in Triton: matmul, RMSNorm and attention over a fixed-capacity cache,
each batch-invariant by construction, as the CPU kernels are (native/kernels.c).

- matmul: every output tile is 16 rows x BN columns; the K loop runs in blocks of 64 in order and
  accumulates in float32, with no split of K: a row's result never depends on the rows beside it
  (BN and the warp count only choose which outputs run together, and are picked from N and K,
  never from M);
- rmsnorm: one program per row;
- attention: a query row's keys are split at fixed absolute positions (SPLIT keys each); each
  split's (max, sum, values) is computed by its own program in blocks of 64 keys in order, and
  the splits are combined in order by a second kernel. A row's keys end at its own position,
  read from a device tensor, so a decode step replays in a CUDA graph while the cache fills.

Imported only where CUDA and Triton are (kvrepl/gpu/model.py picks these or the torch ones).
With TRITON_INTERPRET=1 they also run on the CPU, which the tests use for float32 checks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BM = 16  # rows per tile: fixed (with each weight's BK, it decides the arithmetic)
SPLIT, KB = 512, 64  # keys per attention split, keys per step inside one


@triton.jit(do_not_specialize=["M"])
def _matmul(
    x,
    w,
    out,
    res,
    M,
    N,
    K,
    sxm,
    swn,
    som,
    srm,
    HAS_RES: tl.constexpr,
    BMc: tl.constexpr,
    BN: tl.constexpr,
    BKc: tl.constexpr,
    PREC: tl.constexpr,
):
    """out = [residual +] x @ w^T. Per row, the same operations in the same order whatever rows
    share the tile (M is not specialized on: one compiled kernel serves every row count)."""
    pn, pm = tl.program_id(0), tl.program_id(1)
    rm = pm * BMc + tl.arange(0, BMc)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BKc)
    acc = tl.zeros((BMc, BN), dtype=tl.float32)
    for k0 in range(0, K, BKc):
        a = tl.load(x + rm[:, None] * sxm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(w + rn[:, None] * swn + (k0 + rk)[None, :], mask=rn[:, None] < N, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    y = acc.to(out.dtype.element_ty)
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:  # residual + layer(x), rounded as transformers rounds it
        r = tl.load(res + rm[:, None] * srm + rn[None, :], mask=ok, other=0.0)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + rm[:, None] * som + rn[None, :], y, mask=ok)


def _precision(x: torch.Tensor) -> str:
    """float32 computes in float32 (not tf32); 16-bit inputs use the tensor cores as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) by the weight's shape alone, never by the rows: from
    bench/gpu_tune.py on an H200 at one row (decode). BK divides K."""
    if os.environ.get("KVREPL_GPU_TILES") == "plain":  # the first table, for comparisons
        return (32 if n <= 8192 else 64), 64, 4, 3
    bk = 128 if k % 128 == 0 else 64
    stages = 5 if bk == 128 else 3
    if k >= 8192:  # the down projection: many K steps, few outputs
        return 32, bk, 4, stages
    if n <= 8192:
        return (128 if n > 4096 else 64), bk, 4, stages
    return 64, bk, 4, 5 if n > 32768 else 3


def matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
           residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out[M, N] = x[M, K] @ w[N, K]^T (+ residual), in x's dtype with float32 accumulation."""
    m = x.shape[0]
    n, k = w.shape
    bn, bk, warps, stages = _config(n, k)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, BM))
    res = residual if residual is not None else out
    _matmul[grid](x, w, out, res, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                  res.stride(0), HAS_RES=residual is not None, BMc=BM, BN=bn, BKc=bk,
                  PREC=_precision(x), num_warps=warps, num_stages=stages)  # fmt: skip
    return out


@triton.jit
def _rmsnorm(x, w, out, N, sx, so, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    v = tl.load(x + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
    y = (v * inv).to(out.dtype.element_ty)  # (x * rsqrt(var + eps)).to(dtype), then * weight
    wv = tl.load(w + cols, mask=ok, other=0.0)
    tl.store(out + row * so + cols, (wv.to(tl.float32) * y.to(tl.float32)).to(out.dtype.element_ty),
             mask=ok)  # fmt: skip


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    m, n = x.shape
    _rmsnorm[(m,)](x, w, out, n, x.stride(0), out.stride(0), eps, BLOCK=triton.next_power_of_2(n))
    return out


@triton.jit(do_not_specialize=["window"])
def _attn_split(q, kc, vc, part, pos0, sqm, skh, KVH, G, D: tl.constexpr, GP: tl.constexpr,
                window, scale, NSPLIT, SPLITc: tl.constexpr, KBc: tl.constexpr,
                PREC: tl.constexpr):  # fmt: skip
    """Program (row m, K/V head g, split s): the keys of [s*SPLIT, (s+1)*SPLIT) row m sees,
    in blocks of KB at absolute positions, with an online softmax in order."""
    pid = tl.program_id(0)
    s = pid % NSPLIT
    g = (pid // NSPLIT) % KVH
    m = pid // NSPLIT // KVH
    pos = tl.load(pos0) + m
    lo = pos * 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    k_start = tl.maximum(s * SPLITc, lo)
    k_end = tl.minimum((s + 1) * SPLITc, pos + 1)
    heads = tl.arange(0, GP)
    dims = tl.arange(0, D)
    qv = tl.load(q + m * sqm + (g * G + heads)[:, None] * D + dims[None, :],
                 mask=heads[:, None] < G, other=0.0)  # fmt: skip
    mx = tl.full((GP,), float("-inf"), tl.float32)
    lsum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for j0 in range((k_start // KBc) * KBc, k_end, KBc):
        keys = j0 + tl.arange(0, KBc)
        valid = (keys >= k_start) & (keys < k_end)
        kv = tl.load(
            kc + g * skh + keys[:, None] * D + dims[None, :], mask=valid[:, None], other=0.0
        )
        sc = tl.dot(qv, tl.trans(kv), input_precision=PREC).to(tl.float32) * scale
        sc = tl.where(valid[None, :], sc, float("-inf"))
        new = tl.maximum(mx, tl.max(sc, axis=1))
        p = tl.exp(sc - new[:, None])
        alpha = tl.exp(mx - new)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        vv = tl.load(
            vc + g * skh + keys[:, None] * D + dims[None, :], mask=valid[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC).to(tl.float32)
        mx = new
    out = part + ((m * KVH + g) * NSPLIT + s) * GP * (D + 2)
    tl.store(out + heads * (D + 2), mx)
    tl.store(out + heads * (D + 2) + 1, lsum)
    tl.store(out + heads[:, None] * (D + 2) + 2 + dims[None, :], acc)


@triton.jit(do_not_specialize=["window"])
def _attn_combine(part, o, pos0, som, KVH, G, D: tl.constexpr, GP: tl.constexpr, window,
                  NSPLIT, SPLITc: tl.constexpr):  # fmt: skip
    """Program (row m, K/V head g): its splits' partials, combined in order."""
    pid = tl.program_id(0)
    m, g = pid // KVH, pid % KVH
    pos = tl.load(pos0) + m
    lo = pos * 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    heads = tl.arange(0, GP)
    dims = tl.arange(0, D)
    base = part + (m * KVH + g) * NSPLIT * GP * (D + 2)
    mx = tl.full((GP,), float("-inf"), tl.float32)
    for s in range(lo // SPLITc, pos // SPLITc + 1):
        mx = tl.maximum(mx, tl.load(base + s * GP * (D + 2) + heads * (D + 2)))
    lsum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for s in range(lo // SPLITc, pos // SPLITc + 1):
        p = base + s * GP * (D + 2)
        f = tl.exp(tl.load(p + heads * (D + 2)) - mx)
        lsum += tl.load(p + heads * (D + 2) + 1) * f
        acc += tl.load(p + heads[:, None] * (D + 2) + 2 + dims[None, :]) * f[:, None]
    y = acc / lsum[:, None]
    tl.store(o + m * som + (g * G + heads)[:, None] * D + dims[None, :], y.to(o.dtype.element_ty),
             mask=heads[:, None] < G)  # fmt: skip


def attention(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    pos0: torch.Tensor,
    out: torch.Tensor,
    part: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [M, H*D] at positions pos0[0].. over the cache kc/vc
    [kvh, cap, D] (holding their own K/V): out [M, H*D]. `part` holds the splits' partials:
    at least M * kvh * nsplit * GP * (D + 2) float32, nsplit = cap // SPLIT."""
    m = q.shape[0]
    kvh, cap, d = kc.shape
    heads = out.shape[1] // d  # q may be the whole qkv row: its first H*D are q
    g = heads // kvh
    gp = max(16, triton.next_power_of_2(g))  # a dot needs 16 rows
    nsplit = triton.cdiv(cap, SPLIT)
    _attn_split[(m * kvh * nsplit,)](q, kc, vc, part, pos0, q.stride(0), kc.stride(0), kvh, g,
                                      D=d, GP=gp, window=window, scale=scale, NSPLIT=nsplit,
                                      SPLITc=SPLIT, KBc=KB, PREC=_precision(q))  # fmt: skip
    _attn_combine[(m * kvh,)](part, out, pos0, out.stride(0), kvh, g, D=d, GP=gp,
                              window=window, NSPLIT=nsplit, SPLITc=SPLIT)  # fmt: skip
    return out


def part_floats(rows: int, kv_heads: int, cap: int, g: int, d: int) -> int:
    gp = max(16, triton.next_power_of_2(g))
    return rows * kv_heads * triton.cdiv(cap, SPLIT) * gp * (d + 2)


@triton.jit
def _rope_store(qkv, cos_t, sin_t, kc, vc, pos0, sqm, skh, H, KVH, D: tl.constexpr,
                HALF: tl.constexpr, ROT: tl.constexpr):  # fmt: skip
    """Program (row m, head h of the H + KVH query and key heads): rotate it by its position
    (transformers' halves rotation, in float32, one rounding); a key head, with its value head,
    goes into the caches at that position."""
    m, h = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos0) + m
    i = tl.arange(0, HALF)
    row = qkv + m * sqm + h * D
    a = tl.load(row + i).to(tl.float32)
    b = tl.load(row + HALF + i).to(tl.float32)
    c1 = tl.load(cos_t + pos * ROT + i)
    s1 = tl.load(sin_t + pos * ROT + i)
    c2 = tl.load(cos_t + pos * ROT + HALF + i)
    s2 = tl.load(sin_t + pos * ROT + HALF + i)
    ra = (a * c1 - b * s1).to(qkv.dtype.element_ty)
    rb = (b * c2 + a * s2).to(qkv.dtype.element_ty)
    if h < H:
        tl.store(row + i, ra)
        tl.store(row + HALF + i, rb)
    else:
        g = h - H
        dst = kc + g * skh + pos * D
        tl.store(dst + i, ra)
        tl.store(dst + HALF + i, rb)
        d = tl.arange(0, D)
        v = tl.load(qkv + m * sqm + (H + KVH + g) * D + d)
        tl.store(vc + g * skh + pos * D + d, v)


def rope_store(
    qkv: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    pos0: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> None:
    """Rotate q (in place in qkv [M, (H + 2 KVH) * D]) and k by their positions pos0[0]..; k and
    v go into the caches [KVH, cap, D]. cos/sin: float32 [positions, D]."""
    m = qkv.shape[0]
    d = kc.shape[2]
    _rope_store[(m, heads + kv_heads)](qkv, cos_t, sin_t, kc, vc, pos0, qkv.stride(0),
                                       kc.stride(0), heads, kv_heads, D=d, HALF=d // 2,
                                       ROT=cos_t.shape[1])  # fmt: skip


@triton.jit
def _silu_mul(gu, out, F, sg, so, BLOCK: tl.constexpr):
    m, blk = tl.program_id(0), tl.program_id(1)
    i = blk * BLOCK + tl.arange(0, BLOCK)
    ok = i < F
    g = tl.load(gu + m * sg + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu + m * sg + F + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + m * so + i, (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=ok)


def silu_mul(gu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[M, F] = silu(gu[:, :F]) * gu[:, F:]."""
    m, f = out.shape
    _silu_mul[(m, triton.cdiv(f, 1024))](gu, out, f, gu.stride(0), out.stride(0), BLOCK=1024)
    return out
