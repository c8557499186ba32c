"""The GPU path's kernels, in Triton: the matmul (with its prologue and epilogues) and RMSNorm,
each batch-invariant by construction, as the CPU kernels are (native/kernels.c); the attention
kernels are in triton_attn.py (re-exported here: model.py takes every kernel from this module),
and how kernels follow one another (programmatic dependent launch, the weights' L2 prefetch) in
triton_pdl.py, the tiles of GGUF blocks in triton_quant.py. A Llama layer is eight kernels:

- matmul: every output tile is 16 rows x BN columns; the K loop runs in blocks of BK in order and
  accumulates in float32, with no split of K: a row's result never depends on the rows beside it.
  BK is chosen by the weight's shape alone; BN, the warps and the stages only choose which
  outputs run together (bit-identical for every choice), so decode takes many narrow programs
  and prefill wide ones. Its epilogues: the residual add;
  silu(gate) * up (a program holds the same columns of both, in two accumulators); and the
  rotary embedding of q and k with k and v stored into the cache at each row's position (a
  program holds a head's first-half columns and their partners half a head on);
- rmsnorm: one program per row;
- attention: two kernels (triton_attn.py).

Imported only where CUDA and Triton are (kvrepl/backends/gpu/model.py picks these or the torch
ones). With TRITON_INTERPRET=1 they also run on the CPU (float32, for their arithmetic, not for
bit-identity: numpy's matmul is not row-invariant).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvrepl.backends.gpu import triton_pdl as P
from kvrepl.backends.gpu import triton_quant as Q
from kvrepl.backends.gpu.triton_attn import attention, part_floats

__all__ = ["attention", "matmul", "matmul_rope", "part_floats", "rmsnorm"]

BM = 16  # rows per tile: fixed (with each weight's BK, it decides the arithmetic)
# How a GGUF-block weight's tile is loaded (the same values either way; bench/gpu_gguf.py times
# both): "blocks", by blocks of 32, or "elements", each element's byte and scale on its own.
QLOAD = os.environ.get("KVREPL_GPU_QLOAD", "blocks")
# decode (m <= BM) over GGUF blocks takes _qdecode's tiles (False: _config's, as before them)
QDECODE = True
# How a GGUF block's quants become floats (triton_quant._float): "convert", the int -> float
# instruction (as before); "bits", made by their bits (the same floats, fewer instructions); "f16":
# weights with float16 scales dequantized in float16, the activations cast to float16 (other
# values). Not yet timed on a GPU: `KVREPL_GGUF_MODES=convert,bits,f16 bench_gpu.py --gguf 8B`.
QFLOAT = os.environ.get("KVREPL_GPU_QFLOAT", "convert")
# (GGUF type, rows, K, pair) -> (BN, warps, stages, QLOAD) for a decode step (m <= BM): the
# benchmarks' override of the quantized configs (empty: _qdecode's)
QPICK: dict = {}


@triton.jit(do_not_specialize=["M"])
def _matmul(x, w, wd, wm, out, res, qo, cos_t, sin_t, kc, vc, pos0, M, N, K, sxm, swn, sdn, som,
            srm, sqo, skh, H, KVH, HAS_RES: tl.constexpr, GLU: tl.constexpr, ROPE: tl.constexpr,
            QT: tl.constexpr, Q3: tl.constexpr, CV: tl.constexpr, D: tl.constexpr,
            ROT: tl.constexpr, BMc: tl.constexpr, BN: tl.constexpr, BKc: tl.constexpr,
            PREC: tl.constexpr, PDL: tl.constexpr, PF: tl.constexpr):  # fmt: skip
    """out = [residual +] x @ w^T; or, with two accumulators, silu(x @ gate^T) * (x @ up^T)
    (GLU: w holds gate's N rows, then up's) or the rotary embedding (ROPE: w is the
    QKV weight, N its rows; a program takes BN columns of heads' first halves and the BN
    columns half a head on: q rotated into qo, k rotated and v into the caches at the rows'
    positions). QT: w holds GGUF blocks, dequantized tile by tile (triton_quant.py). Per row,
    the same operations in the same order whatever rows share the tile (M is not specialized
    on). PDL (triton_pdl): prefetch PF weight columns into L2, then wait for the one before."""
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
    if PDL == 1:
        P.next_may_start()
    if PF > 0:  # the weights never depend on the kernel before
        lines = tl.arange(0, PF // 64) * 64
        P.prefetch_l2(w + tl.where(cols_ok, rn, 0)[:, None] * swn + lines[None, :])
        if GLU or ROPE:
            P.prefetch_l2(w + tl.where(cols_ok, rn2, 0)[:, None] * swn + lines[None, :])
    if PDL:
        P.wait_for_previous()
    rows_ok = rm[:, None] < M
    acc = tl.zeros((BMc, BN), dtype=tl.float32)
    acc2 = tl.zeros((BMc, BN), dtype=tl.float32)
    for k0 in range(0, K, BKc):
        a = Q.activations(x + rm[:, None] * sxm + (k0 + rk)[None, :], rows_ok, CV)
        b = Q.weights(w, wd, wm, rn, k0, rk, swn, sdn, cols_ok, a.dtype, QT, Q3, CV, BKc)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        if GLU or ROPE:
            u = Q.weights(w, wd, wm, rn2, k0, rk, swn, sdn, cols_ok, a.dtype, QT, Q3, CV, BKc)
            acc2 = tl.dot(a, tl.trans(u), acc2, input_precision=PREC)
    if PDL == 2:
        P.next_may_start()
    y = acc.to(out.dtype.element_ty)
    ok = rows_ok & cols_ok[None, :]
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
    cols = n // 2 if pair else n
    while m <= BM and bn > 16 and cols // bn < P.sms():  # decode: a program for every SM
        bn //= 2
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


def _qdecode(qtype: str, rows: int, k: int, pair: bool) -> tuple[int, int, int]:
    """(BN, warps, stages) of a decode step (one row tile) over GGUF blocks with rows wider
    than 1,536 (BK stays _bk's: bit-identical to _config's tiles), from bench/gpu_qtune.py on an
    H100 (2026-12, the 1B and 8B shapes, cold weights in a CUDA graph; the 8B layer's four
    matrices against _config's: Q8_0 206 us against 256, Q4_K 244 against 268, Q4_0 241 against
    253). pair: silu(gate) * up or the rotary halves (rows >= 16384: gate_up)."""
    if rows >= 32768:  # the LM head
        return 128, 4, 2
    gate_up = pair and rows >= 16384
    if qtype == "Q8_0":
        if not pair:
            return 16, 2, 4
        return (32, 2, 4) if gate_up else (32, 4, 4)
    if qtype == "Q4_K":  # float32 scales and minimums
        if gate_up:
            return (16, 1, 4) if k >= 4096 else (32, 4, 3)
        return (32 if rows >= 4096 else 16), 4, 4
    if gate_up:  # Q4_0, Q4_1
        return 32, 2, (2 if k >= 4096 else 4)
    return 16, 4, 4


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


def _cv(wd: torch.Tensor, x: torch.Tensor) -> int:
    """The kernel's CV for GGUF scales wd (QFLOAT; "f16" only where the scales are float16 and
    the activations 16-bit: a float32 model computes in float32)."""
    if QFLOAT == "convert":
        return 1
    half = wd.dtype == torch.float16 and x.dtype in (torch.bfloat16, torch.float16)
    return 2 if QFLOAT == "f16" and half else 0


def _launch(x, w, out, residual, glu, rope, cfg=None, qload=None):  # noqa: ANN001, ANN202
    """The one matmul kernel with its epilogues; cfg (BN, BK, warps, stages) overrides the
    table, qload the GGUF loader (bench/gpu_tune.py, gpu_qtune.py time the candidates)."""
    m, k = x.shape
    rows = w.shape[0]
    n = rows // 2 if glu else rows
    pair = glu or rope is not None
    bn, bk, warps, stages = cfg or _config(rows, k, pair, m)
    qt = getattr(w, "kind", 0)
    wq, wd, wm = (w.q, w.d, w.m if w.m is not None else w.d) if qt else (w, w, w)
    qload = qload or QLOAD
    decode = qt and cfg is None and m <= BM
    if decode and QDECODE and k > 1536:
        bn, warps, stages = _qdecode(w.qtype, rows, k, pair)
    pick = QPICK.get((getattr(w, "qtype", ""), rows, k, pair)) if decode else None
    if pick:
        bn, warps, stages, qload = pick
    if qt and cfg is None and not pick and qload != "blocks" and wd.dtype == torch.float32:
        stages = min(stages, 2)  # Q4_K's float32 scales, a tile of each per stage: shared memory
    res = residual if residual is not None else out
    cos_t, sin_t, kc, vc, pos0, heads, kvh = rope or (out, out, out, out, out, 0, 0)
    d = kc.shape[2] if rope else 16
    grid = (triton.cdiv(n // 2 if rope else n, bn), triton.cdiv(m, BM))
    pdl = P.mode(k)
    _launch.kernel = _matmul[grid](x, wq, wd, wm, out, res, out, cos_t, sin_t, kc, vc, pos0, m, n,
                                   k, x.stride(0),
                  wq.stride(0), wd.stride(0), out.stride(0), res.stride(0), out.stride(0),
                  kc.stride(0), heads, kvh, HAS_RES=residual is not None, GLU=glu,
                  ROPE=rope is not None, QT=qt, Q3=qload == "blocks",
                  CV=_cv(wd, x) if qt else 0, D=d,
                  ROT=cos_t.shape[1] if rope else 1, BMc=BM, BN=bn, BKc=bk, PREC=_precision(x),
                  PDL=pdl,
                  PF=0 if qt else P.prefetch_columns(k, pdl), launch_pdl=pdl > 0,
                  num_warps=warps, num_stages=stages)  # fmt: skip
    return out


@triton.jit(do_not_specialize=["M", "lines"])
def _rmsnorm(x, w, out, N, sx, so, eps, M, pf, lines, BLOCK: tl.constexpr, PDL: tl.constexpr,
             AHEAD: tl.constexpr):  # fmt: skip
    """One program per row; with AHEAD, programs past the M rows prefetch the `lines` lines at
    pf (the next matmul's weights: triton_pdl.ahead) and read nothing else."""
    row = tl.program_id(0)
    if AHEAD and row >= M:
        P.prefetch_share(pf, lines, row - M, tl.num_programs(0) - M, 256)
    else:
        _norm_row(x, w, out, N, sx, so, eps, row, BLOCK, PDL)


@triton.jit
def _norm_row(x, w, out, N, sx, so, eps, row, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL == 1:
        P.next_may_start()
    if PDL:
        P.wait_for_previous()
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    v = tl.load(x + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
    y = (v * inv).to(out.dtype.element_ty)  # (x * rsqrt(var + eps)).to(dtype), then * weight
    wv = tl.load(w + cols, mask=ok, other=0.0)
    if PDL == 2:
        P.next_may_start()
    tl.store(out + row * so + cols, (wv.to(tl.float32) * y.to(tl.float32)).to(out.dtype.element_ty),
             mask=ok)  # fmt: skip


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor,
            ahead: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out = RMSNorm(x) * w, row by row; `ahead`: the weight the next matmul reads, part of
    which this kernel's extra programs ask into L2 (decode steps on Hopper: triton_pdl.ahead)."""
    m, n = x.shape
    pdl = P.mode(n)
    pf, lines, extra = P.ahead(ahead, m, pdl)
    _rmsnorm[(m + (extra if lines else 0),)](x, w, out, n, x.stride(0), out.stride(0), eps, m,
                                             pf if lines else out, lines,
                                             BLOCK=triton.next_power_of_2(n), PDL=pdl,
                                             AHEAD=lines > 0, launch_pdl=pdl > 0)  # fmt: skip
    return out
