#!/usr/bin/env python
"""Where a GGUF Q4_0 decode matmul's time goes on the GPU: one small kernel (a 16-row tile, one
row used, as a decode step runs) over the same 4-bit blocks, with each way of turning a tile of
nibbles into the dot's operand, timed in a CUDA graph over copies past the L2, beside the bf16
weight and the product's own kernel (both loaders).

Modes (the tile's values):
- bf16: a bf16 weight (the rate to beat, 4x the bytes);
- i2f: (q - 8) * d in float32, q converted int -> float (the product's arithmetic), then bf16;
- magic: the same values, q made a float by its bits (0x4B000000 | q is 2^23 + q): no int ->
  float conversion, bit-identical to i2f;
- f16: (q - 8) * d in float16 (q by its bits, 0x6400 | q is 1024 + q), x cast to float16;
- f16h: f16 with a byte's two nibbles used where they are (low: a block's first 16 weights,
  high: its last 16), two dots a step over half the bytes, no repeated loads;
- bits: no arithmetic (the nibble's bits as a bf16): the loads and the dot alone.

    python bench/gpu_dequant.py            # prints one JSON line per (shape, mode): best config
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODES = {"bf16": 0, "i2f": 1, "magic": 2, "f16": 3, "bits": 4, "f16h": 5}
SHAPES = {"8B.gu": (28672, 4096), "8B.down": (4096, 14336), "8B.qkv": (6144, 4096),
          "1B.gu": (16384, 2048)}  # fmt: skip
CONFIGS = [(16, 2, 3), (16, 4, 4), (32, 2, 4), (32, 4, 4), (64, 4, 3), (64, 4, 4)]


@triton.jit
def _k(x, w, d, out, N, K, swn, sdn, MODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pn = tl.program_id(0)
    rn = pn * BN + tl.arange(0, BN)
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BK)
    acc = tl.zeros((16, BN), dtype=tl.float32)
    one = rm[:, None] < 1
    for k0 in range(0, K, BK):
        if MODE == 5:  # half the bytes: low nibbles -> columns b*32 + j, high -> b*32 + 16 + j
            hk = tl.arange(0, BK // 2)
            blk = k0 // 32 + hk // 16
            j = hk % 16
            byte = tl.load(w + rn[:, None] * swn + (k0 // 2 + hk)[None, :])
            dd = tl.load(d + rn[:, None] * sdn + blk[None, :])
            lo = ((byte & 15).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
            hi = ((byte >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
            a_lo = tl.load(x + rm[:, None] * 0 + (blk * 32 + j)[None, :], mask=one, other=0.0)
            a_hi = tl.load(x + rm[:, None] * 0 + (blk * 32 + 16 + j)[None, :], mask=one, other=0.0)
            acc = tl.dot(a_lo.to(tl.float16), tl.trans(lo * dd), acc)
            acc = tl.dot(a_hi.to(tl.float16), tl.trans(hi * dd), acc)
        else:
            kk = k0 + rk
            a = tl.load(x + rm[:, None] * 0 + kk[None, :], mask=one, other=0.0)
            if MODE == 0:
                b = tl.load(w + rn[:, None] * swn + kk[None, :])
            else:
                at = (kk // 32) * 16 + kk % 16
                byte = tl.load(w + rn[:, None] * swn + at[None, :])
                nib = (byte >> ((kk % 32) // 16 * 4).to(tl.uint8)[None, :]) & 15
                dd = tl.load(d + rn[:, None] * sdn + (kk // 32)[None, :])
                if MODE == 1:
                    b = ((nib.to(tl.float32) - 8.0) * dd.to(tl.float32)).to(a.dtype)
                elif MODE == 2:
                    f = (nib.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
                    b = ((f - 8388616.0) * dd.to(tl.float32)).to(a.dtype)
                elif MODE == 3:
                    h = (nib.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
                    b = h * dd
                    a = a.to(tl.float16)
                else:
                    b = (nib.to(tl.int16) | 0x3F80).to(tl.bfloat16, bitcast=True)
            acc = tl.dot(a, tl.trans(b), acc)
    tl.store(out + rn[None, :] + rm[:, None] * 0, acc.to(out.dtype.element_ty), mask=one)


def run(mode: str, x: torch.Tensor, ws: list, d: list, out: torch.Tensor, cfg: tuple) -> list:
    bn, warps, stages = cfg
    n = out.shape[1]
    fns = []
    for w, dd in zip(ws, d, strict=True):
        k = x.shape[1]

        def f(w=w, dd=dd, k=k) -> None:  # noqa: ANN001
            run.kernel = _k[(n // bn,)](x, w, dd, out, n, k, w.stride(0), dd.stride(0),
                                        MODE=MODES[mode], BN=bn, BK=128, num_warps=warps,
                                        num_stages=stages)  # fmt: skip

        fns.append(f)
    return fns


def _ops(kernel) -> dict:  # noqa: ANN001
    """How many of the instructions that tell the dequantization's cost the kernel's PTX has."""
    ptx = getattr(kernel, "asm", {}).get("ptx", "")
    ops = ("mma.sync", "wgmma", "ldmatrix", "st.shared", "ld.shared", "cvt.rn.f32", "cvt.rn.bf16",
           "cvt.f32", "cvt.rn.f16", "prmt", "lop3", "fma.rn", "mul.f32", "mul.rn.f16")
    return {op: ptx.count(op) for op in ops if ptx.count(op)}


def shape_rows(name: str, n: int, k: int) -> list[dict]:
    import gpu_tune

    from kvrepl.backends.gpu import triton_ops as T
    from kvrepl.backends.gpu.qweights import QWeight

    g = torch.Generator(device="cuda").manual_seed(5)
    nq = n * k // 2
    copies = max(2, min(40, 200_000_000 // nq))
    qs = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=g)
          for _ in range(copies)]  # fmt: skip
    ds = [(torch.rand(n, k // 32, device="cuda", generator=g) * 1e-2 + 1e-3).half()
          for _ in range(copies)]  # fmt: skip
    nb = max(2, min(40, 200_000_000 // (n * k * 2)))
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(nb)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    rows = []
    ref = {}
    for mode in MODES:
        best = None
        for cfg in CONFIGS:
            try:
                if mode == "bf16":
                    fns = run(mode, x, wb, wb, out, cfg)
                else:
                    fns = run(mode, x, qs, ds, out, cfg)
                us = gpu_tune.graphed_us(fns)
                fns[0]()
                val = out.float().clone()
                ptx = _ops(run.kernel)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit
                rows.append({"shape": name, "mode": mode, "cfg": cfg, "error": str(exc)[:100]})
                continue
            if best is None or us < best[0]:
                best = (us, cfg, val, ptx)
        if best is None:
            continue
        us, cfg, val, ptx = best
        ref[mode] = val
        gb = (n * k * 2 if mode == "bf16" else nq + n * k // 32 * 2) / 1e9
        row = {"shape": name, "mode": mode, "us": round(us, 2), "cfg": cfg,
               "tb_s": round(gb / us * 1e3, 2), "ptx": ptx}  # fmt: skip
        if mode != "bf16" and "i2f" in ref:
            diff = (val - ref["i2f"]).abs().max() / ref["i2f"].abs().max()
            row["same_as_i2f"] = bool(torch.equal(val, ref["i2f"]))
            row["rel_to_i2f"] = float(diff)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for qload in ("blocks", "elements"):  # the product's kernel, its own decode config
        fns = [lambda q=q, dd=dd, ql=qload: T._launch(x, QWeight("Q4_0", q, dd, None), out, None,
                                                       False, None, qload=ql)
               for q, dd in zip(qs, ds, strict=True)]  # fmt: skip
        us = gpu_tune.graphed_us(fns)
        fns[0]()
        row = {"shape": name, "mode": f"product.{qload}", "us": round(us, 2)}  # its own tiles
        rows.append(row)
        print(json.dumps(row), flush=True)
    del qs, ds, wb
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}), flush=True)  # fmt: skip
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        shape_rows(name, n, k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
