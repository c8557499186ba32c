"""The GPU path's kernels, in Triton: matmul (with its epilogues), RMSNorm and attention over a
fixed-capacity cache, each batch-invariant by construction, as the CPU kernels are
(native/kernels.c). A layer is eight kernels:

- matmul: every output tile is 16 rows x BN columns; the K loop runs in blocks of BK in order and
  accumulates in float32, with no split of K: a row's result never depends on the rows beside it.
  BK is chosen by the weight's shape alone; BN, the warps and the stages only choose which
  outputs run together (bit-identical for every choice), so decode takes many narrow programs
  and prefill wide ones. Its epilogues: the residual add; silu(gate) * up (a program holds the
  same columns of both, in two accumulators); and the rotary embedding of q and k with k and v
  stored into the cache at each row's position (a program holds a head's first-half columns and
  their partners half a head on);
- rmsnorm: one program per row;
- attention: a query row's keys are split at fixed absolute positions (SPLIT keys each); each
  split's (max, sum, values) is computed by its own program in blocks of 64 keys in order, and
  the splits are combined in order by a second kernel. A row's keys end at its own position,
  read from a device tensor, so a decode step replays in a CUDA graph while the cache fills.

On Hopper, a small model's kernels use programmatic dependent launch (see _pdl).
Imported only where CUDA and Triton are (kvrepl/backends/gpu/model.py picks these or the torch
ones). With TRITON_INTERPRET=1 they also run on the CPU (float32, for their arithmetic, not for
bit-identity: numpy's matmul is not row-invariant).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_PDL = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability() >= (9, 0)
_PDL = _PDL and os.environ.get("KVREPL_GPU_PDL", "1") != "0"
SMALL = 1536  # widest layer that is latency-bound (SmolLM2-135M's shapes; 1B is not)


def _pdl(width: int) -> bool:
    """Programmatic dependent launch (Hopper on) for the kernels of a layer at most SMALL wide:
    each is scheduled while the one before it ends and waits on the GPU, not for a launch. It
    pays where the kernels take a few microseconds each (the 135M step's graph: 1,002 -> 735
    us) and costs where they are bandwidth-bound (1B: 1,111 -> 1,495 us; 8B: 4,486 -> 5,707):
    `bench/gpu_tune.py --step SHAPE`, with KVREPL_GPU_PDL=0 for the other side."""
    return _PDL and width <= SMALL


BM = 16  # rows per tile: fixed (with each weight's BK, it decides the arithmetic)
SPLIT, KB = 512, 64  # keys per attention split, keys per step inside one


@triton.jit(do_not_specialize=["M"])
def _matmul(x, w, out, res, qo, cos_t, sin_t, kc, vc, pos0, M, N, K, sxm, swn, som, srm, sqo,
            skh, H, KVH, HAS_RES: tl.constexpr, GLU: tl.constexpr, ROPE: tl.constexpr,
            D: tl.constexpr, ROT: tl.constexpr, BMc: tl.constexpr, BN: tl.constexpr,
            BKc: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """out = [residual +] x @ w^T; or, with two accumulators, silu(x @ gate^T) * (x @ up^T)
    (GLU: w holds gate's N rows, then up's) or the rotary embedding (ROPE: w is the QKV weight,
    N its rows; a program takes BN columns of heads' first halves and the BN columns half a
    head on: q rotated into qo, k rotated and v into the caches at the rows' positions). Per
    row, the same operations in the same order whatever rows share the tile (M is not
    specialized on: one compiled kernel serves every row count). PDL: it starts while the
    kernel before it ends, and waits for it before touching any activation."""
    pn, pm = tl.program_id(0), tl.program_id(1)
    rm = pm * BMc + tl.arange(0, BMc)
    rk = tl.arange(0, BKc)
    c = pn * BN + tl.arange(0, BN)
    if ROPE:  # c: a column of the heads' first halves
        rn = (c // (D // 2)) * D + c % (D // 2)
        rn2 = rn + D // 2
        cols_ok = c < N // 2
    else:
        rn = c
        rn2 = N + c
        cols_ok = c < N
    if PDL:
        _next_may_start()
        _wait_for_previous()
    acc = tl.zeros((BMc, BN), dtype=tl.float32)
    acc2 = tl.zeros((BMc, BN), dtype=tl.float32)
    for k0 in range(0, K, BKc):
        a = tl.load(x + rm[:, None] * sxm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(w + rn[:, None] * swn + (k0 + rk)[None, :], mask=cols_ok[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        if GLU or ROPE:
            u = tl.load(w + rn2[:, None] * swn + (k0 + rk)[None, :], mask=cols_ok[:, None],
                        other=0.0)  # fmt: skip
            acc2 = tl.dot(a, tl.trans(u), acc2, input_precision=PREC)
    y = acc.to(out.dtype.element_ty)
    ok = (rm[:, None] < M) & cols_ok[None, :]
    if ROPE:
        _rope_epilogue(y, acc2.to(out.dtype.element_ty), qo, cos_t, sin_t, kc, vc, pos0, rm, rn,
                       c, ok, sqo, skh, H, KVH, D, ROT)  # fmt: skip
    else:
        if GLU:  # gate and up each rounded, then silu(gate) * up in float32, as transformers does
            g = y.to(tl.float32)
            up = acc2.to(out.dtype.element_ty).to(tl.float32)
            y = (g / (1.0 + tl.exp(-g)) * up).to(out.dtype.element_ty)
        if HAS_RES:  # residual + layer(x), rounded as transformers rounds it
            r = tl.load(res + rm[:, None] * srm + rn[None, :], mask=ok, other=0.0)
            y = (r.to(tl.float32) + y.to(tl.float32)).to(out.dtype.element_ty)
        tl.store(out + rm[:, None] * som + rn[None, :], y, mask=ok)


@triton.jit
def _next_may_start():
    """Programmatic dependent launch: the next kernel may be scheduled now (it waits, in
    _wait_for_previous, before it reads anything this one writes)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _wait_for_previous():
    """Until the kernel before (and so every kernel before it) has finished and its writes are
    visible: every PDL kernel calls it before its first read of activations or cache, and
    before its first write."""
    tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _rope_epilogue(a, b, qo, cos_t, sin_t, kc, vc, pos0, rm, rn, c, ok, sqo, skh, H, KVH,
                   D: tl.constexpr, ROT: tl.constexpr):  # fmt: skip
    """a: a head's first-half columns (rn), b: the same columns half a head on. Rotated by
    each row's position (transformers' halves rotation, in float32 from the rounded values, one
    rounding): q into qo, k into the cache at the row's position; v into its cache as it is."""
    half: tl.constexpr = D // 2
    j = (c % half)[None, :]
    pos = (tl.load(pos0) + rm)[:, None]
    c1 = tl.load(cos_t + pos * ROT + j, mask=ok, other=0.0)
    s1 = tl.load(sin_t + pos * ROT + j, mask=ok, other=0.0)
    c2 = tl.load(cos_t + pos * ROT + half + j, mask=ok, other=0.0)
    s2 = tl.load(sin_t + pos * ROT + half + j, mask=ok, other=0.0)
    af, bf = a.to(tl.float32), b.to(tl.float32)
    ra = (af * c1 - bf * s1).to(a.dtype)
    rb = (bf * c2 + af * s2).to(a.dtype)
    head = (rn // D)[None, :]
    isq = ok & (head < H)
    tl.store(qo + rm[:, None] * sqo + rn[None, :], ra, mask=isq)
    tl.store(qo + rm[:, None] * sqo + rn[None, :] + half, rb, mask=isq)
    at = pos * D + j
    isk = ok & (head >= H) & (head < H + KVH)
    tl.store(kc + (head - H) * skh + at, ra, mask=isk)
    tl.store(kc + (head - H) * skh + at + half, rb, mask=isk)
    isv = ok & (head >= H + KVH)
    tl.store(vc + (head - H - KVH) * skh + at, a, mask=isv)
    tl.store(vc + (head - H - KVH) * skh + at + half, b, mask=isv)


def _precision(x: torch.Tensor) -> str:
    """float32 computes in float32 (not tf32); 16-bit inputs use the tensor cores as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _config(n: int, k: int, pair: bool = False, m: int = 1) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) for a weight of n rows and k columns (pair: each program takes
    BN of its rows and BN more, for silu(gate) * up or the rotary halves), from
    bench/gpu_tune.py on an H200 (cold weights, as in a decode step). BK divides K and depends
    on the weight's shape alone: it decides the arithmetic. The rest only decides which outputs
    one program computes (bit-identical for every choice, gpu_tune checks), so it may follow
    the rows: one row tile (decode) wants many small programs, each fetching little."""
    bk = _bk(n, k)
    if m <= BM and k <= 1536:  # a small model's decode step: latency, not bandwidth
        if n >= 32768:  # the LM head
            return 16, bk, 2, 5
        return 16, bk, (2 if bk >= 256 or pair else 4), 5
    bn, warps, stages = _table(n, k, bk)
    if pair:  # the same weight rows per program: half in each accumulator
        bn = max(16, bn // 2)
    return bn, bk, warps, stages


def _bk(n: int, k: int) -> int:
    if k <= 1536 and k % 256 == 0 and k >= 1024:  # a small model's down projection
        return 256
    return 128 if k % 128 == 0 else 64


def _table(n: int, k: int, bk: int) -> tuple[int, int, int]:
    stages = 5 if bk == 128 else 3
    if k >= 8192:  # the down projection: many K steps, few outputs
        return 32, 4, stages
    if n <= 8192:
        return (128 if n > 4096 else 64), 4, stages
    return 64, 4, 5 if n > 32768 else 3


def matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
           residual: torch.Tensor | None = None, *, glu: bool = False) -> torch.Tensor:  # fmt: skip
    """out[M, N] = x[M, K] @ w[N, K]^T (+ residual), in x's dtype with float32 accumulation.
    glu: w is [2N, K] (gate, then up) and out = silu(x @ gate^T) * (x @ up^T)."""
    return _launch(x, w, out, residual, glu, None)


def matmul_rope(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, cos_t: torch.Tensor,
                sin_t: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos0: torch.Tensor,
                heads: int, kv_heads: int) -> torch.Tensor:  # fmt: skip
    """x @ w^T (w: the QKV weight, [(H + 2 KVH) * D, K]), then q rotated by the rows' positions
    pos0[0].. into q [M, H * D], and k rotated and v into the caches [KVH, cap, D] at those
    positions. cos/sin: float32 [positions, D]."""
    return _launch(x, w, q, None, False, (cos_t, sin_t, kc, vc, pos0, heads, kv_heads))


def _launch(x, w, out, residual, glu, rope, cfg=None):  # noqa: ANN001, ANN202
    """The one matmul kernel with its epilogues; cfg (BN, BK, warps, stages) overrides the
    table (bench/gpu_tune.py times the candidates)."""
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    bn, bk, warps, stages = cfg or _config(w.shape[0], k, glu or rope is not None, m)
    res = residual if residual is not None else out
    cos_t, sin_t, kc, vc, pos0, heads, kvh = rope or (out, out, out, out, out, 0, 0)
    d = kc.shape[2] if rope else 16
    grid = (triton.cdiv(n // 2 if rope else n, bn), triton.cdiv(m, BM))
    pdl = _pdl(k)
    _matmul[grid](x, w, out, res, out, cos_t, sin_t, kc, vc, pos0, m, n, k, x.stride(0),
                  w.stride(0), out.stride(0), res.stride(0), out.stride(0), kc.stride(0), heads,
                  kvh, HAS_RES=residual is not None, GLU=glu, ROPE=rope is not None, D=d,
                  ROT=cos_t.shape[1] if rope else 1, BMc=BM, BN=bn, BKc=bk, PREC=_precision(x),
                  PDL=pdl, launch_pdl=pdl,
                  num_warps=warps, num_stages=stages)  # fmt: skip
    return out


@triton.jit
def _rmsnorm(x, w, out, N, sx, so, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    if PDL:
        _next_may_start()
        _wait_for_previous()
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
    _rmsnorm[(m,)](x, w, out, n, x.stride(0), out.stride(0), eps, BLOCK=triton.next_power_of_2(n),
                   PDL=_pdl(n), launch_pdl=_pdl(n))  # fmt: skip
    return out


@triton.jit(do_not_specialize=["window"])
def _attn_split(q, kc, vc, part, pos0, sqm, skh, KVH, G, D: tl.constexpr, GP: tl.constexpr,
                window, scale, NSPLIT, SPLITc: tl.constexpr, KBc: tl.constexpr,
                PREC: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Program (row m, K/V head g, split s): the keys of [s*SPLIT, (s+1)*SPLIT) row m sees,
    in blocks of KB at absolute positions, with an online softmax in order."""
    if PDL:
        _next_may_start()
        _wait_for_previous()
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
                  NSPLIT, SPLITc: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Program (row m, K/V head g): its splits' partials, combined in order."""
    if PDL:
        _next_may_start()
        _wait_for_previous()
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
    pdl = _pdl(out.shape[1])
    _attn_split[(m * kvh * nsplit,)](q, kc, vc, part, pos0, q.stride(0), kc.stride(0), kvh, g,
                                      D=d, GP=gp, window=window, scale=scale, NSPLIT=nsplit,
                                      SPLITc=SPLIT, KBc=KB, PREC=_precision(q), PDL=pdl,
                                      launch_pdl=pdl)  # fmt: skip
    _attn_combine[(m * kvh,)](part, out, pos0, out.stride(0), kvh, g, D=d, GP=gp,
                              window=window, NSPLIT=nsplit, SPLITc=SPLIT, PDL=pdl,
                              launch_pdl=pdl)  # fmt: skip
    return out


def part_floats(rows: int, kv_heads: int, cap: int, g: int, d: int) -> int:
    gp = max(16, triton.next_power_of_2(g))
    return rows * kv_heads * triton.cdiv(cap, SPLIT) * gp * (d + 2)
