"""The GPU path's attention kernels, in Triton, over a fixed-capacity cache: batch-invariant by
construction. A query row's keys are split at fixed absolute positions (SPLIT keys each); each
split's (max, sum, values) is computed by its own program in blocks of KB keys in order, and the
splits are combined in order by a second kernel. A row's keys end at its own position, read from
a device tensor, so a decode step replays in a CUDA graph while the cache fills. Owns these two
kernels and their launch; not the matmul or the norm (triton_ops.py), nor how kernels follow one
another (triton_pdl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrepl.backends.gpu import triton_pdl as P

SPLIT, KB = 512, 64  # keys per attention split, keys per step inside one


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit(do_not_specialize=["window", "REAL", "lines"])
def _attn_split(q, kc, vc, part, pos0, sqm, skh, KVH, G, D: tl.constexpr, GP: tl.constexpr,
                window, scale, NSPLIT, SPLITc: tl.constexpr, KBc: tl.constexpr,
                PREC: tl.constexpr, PDL: tl.constexpr, REAL, pf, lines,
                AHEAD: tl.constexpr):  # fmt: skip
    """Program (row m, K/V head g, split s): the keys of [s*SPLIT, (s+1)*SPLIT) row m sees,
    in blocks of KB at absolute positions, with an online softmax in order. With AHEAD, the
    programs past the REAL ones prefetch the next matmul's weights (triton_pdl.ahead)."""
    pid = tl.program_id(0)
    if AHEAD and pid >= REAL:
        P.prefetch_share(pf, lines, pid - REAL, tl.num_programs(0) - REAL, 256)
    else:
        _split(q, kc, vc, part, pos0, sqm, skh, KVH, G, D, GP, window, scale, NSPLIT, SPLITc,
               KBc, PREC, PDL, pid)  # fmt: skip


@triton.jit
def _split(q, kc, vc, part, pos0, sqm, skh, KVH, G, D: tl.constexpr, GP: tl.constexpr, window,
           scale, NSPLIT, SPLITc: tl.constexpr, KBc: tl.constexpr, PREC: tl.constexpr,
           PDL: tl.constexpr, pid):  # fmt: skip
    if PDL == 1:
        P.next_may_start()
    if PDL:
        P.wait_for_previous()
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
    if PDL == 2:
        P.next_may_start()
    out = part + pid.to(tl.int64) * (GP * (D + 2))  # pid = (m * KVH + g) * NSPLIT + s; int64:
    # at 128k positions a 512-row chunk's partials pass 2^31 floats
    tl.store(out + heads * (D + 2), mx)
    tl.store(out + heads * (D + 2) + 1, lsum)
    tl.store(out + heads[:, None] * (D + 2) + 2 + dims[None, :], acc)


@triton.jit(do_not_specialize=["window"])
def _attn_combine(part, o, pos0, som, KVH, G, D: tl.constexpr, GP: tl.constexpr, window,
                  NSPLIT, SPLITc: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Program (row m, K/V head g): its splits' partials, combined in order."""
    if PDL == 1:
        P.next_may_start()
    if PDL:
        P.wait_for_previous()
    pid = tl.program_id(0)
    m, g = pid // KVH, pid % KVH
    pos = tl.load(pos0) + m
    lo = pos * 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    heads = tl.arange(0, GP)
    dims = tl.arange(0, D)
    base = part + pid.to(tl.int64) * NSPLIT * (GP * (D + 2))  # pid = m * KVH + g
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
    if PDL == 2:
        P.next_may_start()
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
    *,
    ahead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [M, H*D] at positions pos0[0].. over the cache kc/vc
    [kvh, cap, D] (holding their own K/V): out [M, H*D]. `part` holds the splits' partials:
    at least M * kvh * nsplit * GP * (D + 2) float32, nsplit = cap // SPLIT. `ahead`: the
    weight the next matmul reads, part of which the split kernel's extra programs ask into L2."""
    m = q.shape[0]
    kvh, cap, d = kc.shape
    heads = out.shape[1] // d  # q may be the whole qkv row: its first H*D are q
    g = heads // kvh
    gp = max(16, triton.next_power_of_2(g))  # a dot needs 16 rows
    nsplit = triton.cdiv(cap, SPLIT)
    pdl = P.mode(out.shape[1])
    real = m * kvh * nsplit
    pf, lines, extra = P.ahead(ahead, m, pdl)
    _attn_split[(real + (extra if lines else 0),)](
        q, kc, vc, part, pos0, q.stride(0), kc.stride(0), kvh, g, D=d, GP=gp, window=window,
        scale=scale, NSPLIT=nsplit, SPLITc=SPLIT, KBc=KB, PREC=_precision(q), PDL=pdl, REAL=real,
        pf=pf if lines else part, lines=lines, AHEAD=lines > 0, launch_pdl=pdl > 0)
    _attn_combine[(m * kvh,)](part, out, pos0, out.stride(0), kvh, g, D=d, GP=gp,
                              window=window, NSPLIT=nsplit, SPLITc=SPLIT, PDL=pdl,
                              launch_pdl=pdl > 0)  # fmt: skip
    return out


def part_floats(rows: int, kv_heads: int, cap: int, g: int, d: int) -> int:
    gp = max(16, triton.next_power_of_2(g))
    return rows * kv_heads * triton.cdiv(cap, SPLIT) * gp * (d + 2)
