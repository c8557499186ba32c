#!/usr/bin/env python
"""Which tile shapes and loader the GPU path's matmul should take over GGUF blocks (Q8_0, Q4_0,
Q4_K) at one row (a decode step): every candidate (BN, warps, stages) of the blocks loader
(and the elements loader's current tiles), timed inside a CUDA graph over copies of the weight
past the L2 (as
gpu_tune.py times the bf16 shapes), each output checked bit for bit against the current kernel's
(the production config and loader) on 16 rows and on one. The kernels are compiled first in
parallel processes (Triton's cache is shared), then timed in one.

    python bench/gpu_qtune.py --out sweep.jsonl            # 1B and 8B shapes, Q8_0/Q4_0/Q4_K
    python bench/gpu_qtune.py --shapes 8B --qtypes Q4_0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {  # name: (weight rows, K, glu)
    "1B": {"qkv": (3072, 2048, True), "o": (2048, 2048, False), "gu": (16384, 2048, True),
           "down": (2048, 8192, False), "head": (49152, 2048, False)},
    "8B": {"qkv": (6144, 4096, True), "o": (4096, 4096, False), "gu": (28672, 4096, True),
           "down": (4096, 14336, False), "head": (49152, 4096, False)},
}  # fmt: skip (qkv as a pair: the rotary epilogue takes a head's halves as silu * up does)
TILES = ((16, 1), (16, 2), (16, 4), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4))
STAGES = (2, 4)
VARIANTS = (("blocks", 0), ("elements", 0))  # (QLOAD, 0): tried on an H100 and left out, the
# tile as the dot's first operand (wgmma where BN >= 64: not batch-invariant across BN) and
# one dot per half block (other bits than one dot over BK)


def random_qweight(n: int, k: int, qtype: str, seed: int):  # noqa: ANN201
    """Random blocks of that type (no zeros), on the GPU."""
    from kvrepl.backends.gpu.qweights import QWeight

    g = torch.Generator(device="cuda").manual_seed(seed)
    if qtype == "Q8_0":
        q = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    else:
        q = torch.randint(0, 256, (n, k // 2), device="cuda", generator=g, dtype=torch.uint8)
    dt = torch.float32 if qtype == "Q4_K" else torch.float16
    d = (torch.rand(n, k // 32, device="cuda", generator=g) * 1e-3 + 1e-4).to(dt)
    m = -(torch.rand(n, k // 32, device="cuda", generator=g) * 1e-3).to(dt) \
        if qtype == "Q4_K" else None  # fmt: skip
    return QWeight(qtype, q, d, m)


def candidates(qtype: str) -> list[tuple]:
    out = []
    for qload, qv in VARIANTS:
        if qload == "elements":  # the second loader: its default configs only (sweep's first)
            continue
        for bn, warps in TILES:
            for stages in STAGES:
                out.append((qload, qv, bn, warps, stages))
    return out


def _compile(tasks: list[tuple]) -> list[dict]:
    """Each (qtype, glu, qload, qv, bn, warps, stages) launched once on a small weight."""
    from kvrepl.backends.gpu import triton_ops as T

    done = []
    ws = {}
    for qtype, glu, qload, qv, bn, warps, stages in tasks:
        key = (qtype, glu)
        if key not in ws:
            ws[key] = random_qweight(512, 4096, qtype, 1)
        w = ws[key]
        x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(16, 256 if glu else 512, device="cuda", dtype=torch.bfloat16)
        t0 = time.time()
        try:
            T._launch(x, w, out, None, glu, None, cfg=(bn, 128, warps, stages),
                      qload=qload)  # fmt: skip
            torch.cuda.synchronize()
            k = T._launch.kernel
            info = {"regs": k.n_regs, "spills": k.n_spills, "smem": k.metadata.shared}
            ptx = k.asm.get("ptx", "")
            for op in ("mma.sync", "wgmma", "ldmatrix", "st.shared", "ld.shared", "bar.sync",
                       "cp.async", "ld.global", "cvt.rn.f32", "cvt.rn.bf16"):  # fmt: skip
                info[op] = ptx.count(op)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit
            info = {"error": str(exc)[:80]}
        done.append({"task": [qtype, glu, qload, qv, bn, warps, stages],
                     "compile_s": round(time.time() - t0, 1), **info})  # fmt: skip
    return done


def graphed_us(fns: list, reps: int = 10) -> float:
    import gpu_tune

    return gpu_tune.graphed_us(fns, reps)


def sweep(shape: str, name: str, n: int, k: int, glu: bool, qtype: str, bad: set) -> list[dict]:
    from kvrepl.backends.gpu import triton_ops as T

    w0 = random_qweight(n, k, qtype, 7)
    copies = max(2, min(48, 200_000_000 // w0.nbytes()))
    ws = [w0] + [random_qweight(n, k, qtype, 100 + i) for i in range(copies - 1)]
    cols = n // 2 if glu else n
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x16 = torch.randn(16, k, **bf)
    x1 = torch.randn(1, k, **bf)
    cur = T._config(n, k, glu, 1)
    ref16 = T._launch(x16, w0, torch.empty(16, cols, **bf), None, glu, None, cfg=cur,
                      qload="blocks").clone()  # fmt: skip
    ref1 = T._launch(x1, w0, torch.empty(1, cols, **bf), None, glu, None, cfg=cur,
                     qload="blocks").clone()  # fmt: skip
    rows = []
    cands = [("blocks", 0, cur[0], cur[2], cur[3]), ("elements", 0, cur[0], cur[2], cur[3])]
    cands += [c for c in candidates(qtype) if c not in cands]
    for qload, qv, bn, warps, stages in cands:
        if (qtype, glu, qload, qv, bn, warps, stages) in bad:
            continue
        cfg, var = (bn, 128, warps, stages), (qload, qv)
        row = {"shape": f"{shape}.{name}", "qtype": qtype, "qload": qload, "qv": qv, "bn": bn,
               "warps": warps, "stages": stages}  # fmt: skip
        try:
            out1 = torch.empty(1, cols, **bf)
            us = graphed_us([lambda w=w, out1=out1, cfg=cfg, var=var: T._launch(
                x1, w, out1, None, glu, None, cfg=cfg, qload=var[0]) for w in ws])  # fmt: skip
            a16 = T._launch(x16, w0, torch.full((16, cols), float("nan"), **bf), None, glu, None,
                            cfg=cfg, qload=var[0])  # fmt: skip
            a1 = T._launch(x1, w0, torch.full((1, cols), float("nan"), **bf), None, glu, None,
                           cfg=cfg, qload=var[0])  # fmt: skip
            same1 = bool(torch.equal(a1, ref1))
            row.update(us=round(us, 2), same=bool(torch.equal(a16, ref16)) and same1, same1=same1,
                       gbps=round(w0.nbytes() / us / 1e3, 1))  # fmt: skip
            if not row["same"]:
                row["rel"] = float((a16.float() - ref16.float()).abs().max()
                                   / ref16.float().abs().max())  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            row["error"] = str(exc)[:80]
        rows.append(row)
    # the bf16 kernel at its own config, for the rate to beat
    nb = max(2, min(48, 200_000_000 // (n * k * 2)))
    wb = [torch.randn(n, k, **bf) * 0.02 for _ in range(nb)]
    ob = torch.empty(1, cols, **bf)
    us = graphed_us([lambda w=w: T._launch(x1, w, ob, None, glu, None) for w in wb])
    rows.append({"shape": f"{shape}.{name}", "qtype": "bf16", "us": round(us, 2),
                 "gbps": round(n * k * 2 / us / 1e3, 1)})  # fmt: skip
    del ws, wb
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="8B,1B")
    ap.add_argument("--qtypes", default="Q4_0,Q8_0,Q4_K")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--out", default="qtune.jsonl")
    ap.add_argument("--picks", default="qpicks.json", help="the winners (bit-identical, 3%% or "
                    "more faster than the current config): T.QPICK's entries")
    ap.add_argument("--compile-s", type=float, default=150, help="stop compiling after this")
    ap.add_argument("--deadline-s", type=float, default=330, help="time no shape after this")
    args = ap.parse_args()
    qtypes = args.qtypes.split(",")
    shapes = args.shapes.split(",")
    globs = {(qt, g) for s in shapes for (_, _, g) in SHAPES[s].values() for qt in qtypes}
    tasks = [(qt, g, *c) for qt, g in sorted(globs) for c in candidates(qt)]
    for qt, g in sorted(globs):  # the current configs of every shape (elements too)
        for s in shapes:
            for n, k, gg in SHAPES[s].values():
                if gg == g:
                    bn, _, warps, stages = _cfg(n, k, g)
                    for ql in ("blocks", "elements"):
                        t = (qt, g, ql, 0, bn, warps, stages)
                        if t not in tasks:
                            tasks.append(t)
    t0 = time.time()
    compiled = []
    pool = mp.get_context("spawn").Pool(args.workers)
    try:
        for part in pool.imap_unordered(_compile, [[t] for t in tasks]):
            compiled += part
            if time.time() - t0 > args.compile_s:
                break
    finally:
        pool.terminate()
    done = {tuple(r["task"]) for r in compiled if "error" not in r}
    bad = {tuple(t) for t in tasks} - done
    log = open(args.out, "w")  # noqa: SIM115
    for r in compiled:
        log.write(json.dumps({"compiled": r}) + "\n")
    print(json.dumps({"compiled": len(compiled), "errors": len(bad),
                      "compile_s": round(time.time() - t0, 1)}), flush=True)  # fmt: skip
    best = []
    picks = []
    for s in shapes:
        for name, (n, k, glu) in SHAPES[s].items():
            for qt in qtypes:
                if time.time() - t0 > args.deadline_s:
                    continue
                rows = sweep(s, name, n, k, glu, qt, bad)
                for r in rows:
                    log.write(json.dumps(r) + "\n")
                log.flush()
                ok = sorted((r for r in rows if r.get("same") and "us" in r), key=lambda r: r["us"])
                anyv = sorted((r for r in rows if "us" in r and r["qtype"] != "bf16"),
                              key=lambda r: r["us"])  # fmt: skip
                cur = rows[0]
                bf = rows[-1]
                line = {"shape": f"{s}.{name}", "qtype": qt, "bf16_us": bf["us"],
                        "cur_us": cur.get("us"), "best_same": _short(ok[:3]),
                        "best_any": _short(anyv[:2]), "t": round(time.time() - t0)}  # fmt: skip
                best.append(line)
                print(json.dumps(line), flush=True)
                if ok and "us" in cur and ok[0]["us"] < 0.97 * cur["us"]:
                    r = ok[0]
                    picks.append([qt, n, k, glu, r["bn"], r["warps"], r["stages"], r["qload"]])
    log.close()
    Path(args.picks).write_text(json.dumps(picks))
    print(json.dumps({"picks": picks}), flush=True)
    return 0


def _cfg(n: int, k: int, glu: bool) -> tuple:
    from kvrepl.backends.gpu import triton_ops as T

    return T._config(n, k, glu, 1)


def _short(rows: list[dict]) -> list:
    return [[r["qload"][0] + str(r["qv"]), r["bn"], r["warps"], r["stages"], r["us"],
             r.get("same")] for r in rows]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
