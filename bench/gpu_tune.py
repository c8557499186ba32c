#!/usr/bin/env python
"""Which tile shapes the GPU path's matmul should take: every candidate (BN, BK, warps, stages)
for the weight shapes of the benchmark's models, timed at one row (decode) and at 512 (prefill),
with the check that candidates of one BK give bit-identical results (so choosing among them by
shape can never make reuse differ from recompute). Also the 135M-shaped model's decode step:
its CUDA graph alone against the engine's whole step.

    python bench/gpu_tune.py
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kvrepl.gpu import triton_ops as T  # noqa: E402

SHAPES = {"qkv8B": (6144, 4096), "o8B": (4096, 4096), "gu8B": (28672, 4096),
          "down8B": (4096, 14336), "head": (49152, 4096), "gu135M": (3072, 576)}  # fmt: skip


def run(x, w, out, bn, bk, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(n, bn), triton.cdiv(m, T.BM))
    T._matmul[grid](x, w, out, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                    out.stride(0), HAS_RES=False, BMc=T.BM, BN=bn, BKc=bk, PREC="tf32",
                    num_warps=warps, num_stages=stages)  # fmt: skip
    return out


def timed(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps / 1e3


def main() -> int:
    torch.manual_seed(0)
    results = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        rows = []
        for m in (1, 512):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref_by_bk = {}
            for bn, bk, warps, stages in itertools.product((32, 64, 128), (64, 128), (4,),
                                                           (3, 5)):  # fmt: skip
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                try:
                    cfg = (bn, bk, warps, stages)
                    s = timed(lambda x=x, w=w, out=out, cfg=cfg: run(x, w, out, *cfg))
                except Exception as exc:  # noqa: BLE001 - a config that does not fit
                    rows.append({"m": m, "cfg": list(cfg), "error": str(exc)[:80]})
                    continue
                same = ref_by_bk.setdefault(bk, out.clone())
                rows.append({"m": m, "cfg": [bn, bk, warps, stages], "us": s * 1e6,
                             "GBps": n * k * 2 / s / 1e9,
                             "same_as_bk": torch.equal(same, out)})  # fmt: skip
        best = {m: min((r for r in rows if r.get("m") == m and "us" in r), key=lambda r: r["us"])
                for m in (1, 512)}  # fmt: skip
        same = all(r.get("same_as_bk", True) for r in rows)
        results[name] = {"best": best, "all_same_per_bk": same,
                         "current": _config_row(rows, n, k)}  # fmt: skip
        print(json.dumps({name: results[name]}), flush=True)
    results["step_135M"] = step_135m()
    print(json.dumps({"step_135M": results["step_135M"]}), flush=True)
    return 0


def _config_row(rows, n, k):
    bn, bk, warps, stages = T._config(n, k)
    return [r for r in rows if r.get("cfg") == [bn, bk, warps, stages]]


def step_135m():
    from bench_gpu import build, engine, gpu_model, tokens

    from kvrepl.engine import Sampling

    model = build("135M", 4096)
    gm = gpu_model(model, 4096)
    e = engine(gm)
    list(e.stream(tokens(128, 1), Sampling.greedy(8)))
    layers = e.pc.cache.layers
    b = gm._buffers(1)
    g = gm._graph(b, layers)
    graph_s = timed(g.replay, reps=200)
    t = time.perf_counter()
    stats = list(e.stream(tokens(128, 1), Sampling.greedy(200)))[-1]
    step = 1e6 / stats.decode_tok_s
    return {"graph_replay_us": graph_s * 1e6, "engine_tok_s": stats.decode_tok_s,
            "engine_step_us": step, "wall_s": time.perf_counter() - t}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
