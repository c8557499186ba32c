#!/usr/bin/env python
"""Which tile shapes the GPU path's matmul should take: every candidate (BN, BK, warps, stages)
for the weight shapes of the benchmark's models, timed inside a CUDA graph (as the decode step
runs them: no launch overhead in the figure) at one row (decode) and at 512 (prefill), with the
check that candidates of one BK give bit-identical results (so choosing among them, by shape or
by row count, can never make reuse differ from recompute).

    python bench/gpu_tune.py                 # the 135M shapes
    python bench/gpu_tune.py --shapes all    # and the 1B and 8B ones (long: many compiles)
    python bench/gpu_tune.py --step 135M     # a decode step: its graph, and each kernel's time
    KVREPL_GPU_PDL=0 python bench/gpu_tune.py --step 135M   # without programmatic launch
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvrepl.backends.gpu import triton_ops as T  # noqa: E402

SHAPES = {  # name: (weight rows, K, glu)
    "135M": {"qkv": (960, 576, False), "o": (576, 576, False), "gu": (3072, 576, True),
             "down": (576, 1536, False), "head": (49152, 576, False)},
    "1B": {"qkv": (3072, 2048, False), "o": (2048, 2048, False), "gu": (16384, 2048, True),
           "down": (2048, 8192, False)},
    "8B": {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gu": (28672, 4096, True),
           "down": (4096, 14336, False), "head": (49152, 4096, False)},
}  # fmt: skip


def graphed_us(fns: list, reps: int = 10) -> float:
    """Microseconds per call, the calls `fns` replayed in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fns[0]()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / reps / len(fns)


def sweep(n: int, k: int, glu: bool, rows: tuple[int, ...]) -> dict:
    """Each call reads its own copy of the weight, 200 MB in all (past the 50 MB L2, as in a
    decode step, where every weight comes from memory)."""
    copies = max(2, min(48, 200_000_000 // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    w = ws[0]
    cols = n // 2 if glu else n
    table = []
    same = True
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref_by_bk: dict[int, torch.Tensor] = {}
        for bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256),
                                                       (2, 4), (3, 5)):  # fmt: skip
            if k % bk or (warps == 2 and bn > 32):
                continue
            out = torch.empty(m, cols, device="cuda", dtype=torch.bfloat16)
            cfg = (bn, bk, warps, stages)
            try:
                us = graphed_us([lambda x=x, w=w, out=out, cfg=cfg: T._launch(x, w, out, None, glu,
                                                                              None, cfg=cfg)
                                 for w in ws])  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a config that does not fit
                table.append({"m": m, "cfg": cfg, "error": str(exc)[:60]})
                continue
            T._launch(x, w, out, None, glu, None, cfg=cfg)
            first = ref_by_bk.setdefault(bk, out.clone())
            same &= torch.equal(first, out)
            table.append({"m": m, "cfg": cfg, "us": round(us, 2)})
    ok = [r for r in table if "us" in r]
    best = {m: sorted((r for r in ok if r["m"] == m), key=lambda r: r["us"])[:4] for m in rows}
    now = {m: [r for r in ok if r["m"] == m and list(r["cfg"]) == list(T._config(n, k, glu, m))]
           for m in rows}  # fmt: skip
    return {"best": best, "current": now, "all_same_per_bk": same}


def step(shape: str) -> dict:
    """The decode step of a shape at 129 tokens of context: its CUDA graph's replay time, and
    the kernels' times (an eager step under the profiler), per slot of a layer."""
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu import build, gpu_model, tokens

    model = build(shape, 4096)
    gm = gpu_model(model, 4096)
    with torch.inference_mode():
        layers = gm.new_layers()
        gm.forward(tokens(128, 1), layers)
        gm.forward([5], layers)
        b = gm._buffers(1)
        graph = gm._graph(b, layers)
        graph.replay()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(200):
            graph.replay()
        t1.record()
        torch.cuda.synchronize()
        replay_us = t0.elapsed_time(t1) * 1e3 / 200
        gm._run(b, layers)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gm._run(b, layers)
            torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)  # fmt: skip
    n = model.config.num_hidden_layers
    per = (len(ev) - 3) // n  # the embedding first, the final norm and the head last
    slots: dict[str, list[float]] = {}
    for i, e in enumerate(ev[1 : 1 + n * per]):
        slots.setdefault(f"{i % per}:{e.name[:24]}", []).append(e.time_range.elapsed_us())
    return {"shape": shape, "graph_replay_us": round(replay_us, 1), "kernels": len(ev),
            "kernels_us": round(sum(e.time_range.elapsed_us() for e in ev), 1),
            "per_layer_us": {k: round(sum(v) / len(v), 2) for k, v in slots.items()},
            "head_us": round(ev[-1].time_range.elapsed_us(), 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="135M")
    ap.add_argument("--rows", default="1,512")
    ap.add_argument("--step", default=None, help="shapes whose decode step to time")
    args = ap.parse_args()
    if args.step:
        for shape in args.step.split(","):
            print(json.dumps(step(shape)), flush=True)
        return 0
    names = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    rows = tuple(int(r) for r in args.rows.split(","))
    torch.manual_seed(0)
    for model in names:
        for name, (n, k, glu) in SHAPES[model].items():
            r = sweep(n, k, glu, rows)
            print(json.dumps({"shape": f"{model}.{name}", "n": n, "k": k, "glu": glu, **r}),
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
