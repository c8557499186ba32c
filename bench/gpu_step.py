#!/usr/bin/env python
"""The GPU path's decode step, per way of chaining its kernels (triton_pdl.py's modes, prefetch
depths and weights asked ahead): the step's CUDA graph replayed back to back (device time
alone), checked bit-identical across the modes; then, for the first mode, the step as the
engine runs it (the sampler's argmax and the token's copy to the host between steps) and its
host time per call; then each mode through the engine (tok/s). Random-weight Llama shapes of
bench_gpu.py, 128 tokens of context, a cache of the benchmark's capacity (16,896 positions)
unless --capacity says otherwise.

    python bench/gpu_step.py                      # 135M, 1B, 8B
    python bench/gpu_step.py --shapes 135M --modes late:1024:24,late:1024:0,late:0:0,0:0:0
    python bench/gpu_step.py --tiles 1B,8B        # decode tiles of those shapes' weights
    python bench/gpu_step.py --ablate 135M,1B     # what each kind of kernel adds to the step

--tiles: every (BN, warps, stages) at one row for each weight of the shapes (bench/gpu_tune.py's
SHAPES), BK as the kernels fix it, timed in a CUDA graph over 200 MB of weight copies; the
fastest, the one the kernels take now, and whether all gave bit-identical results.

--ablate: the step's graph replayed with one kind of kernel left out (the norms, the attention,
its combine, the matmuls): what each kind costs where it sits in the chain (the logits are then
wrong; only the time is read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import build, gpu_model, kvrepl_decode, tokens  # noqa: E402

from kvrepl.backends.gpu import triton_pdl as P  # noqa: E402

CAPACITY = 16384 + 512


def replay_us(graph: torch.cuda.CUDAGraph, reps: int = 200) -> float:
    graph.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        graph.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / reps


def engine_like_us(gm, layers, n: int = 200) -> tuple[float, float]:  # noqa: ANN001
    """Device time a token with the sampler's argmax and the host copy between steps (the
    engine's loop without its bookkeeping), and the host's time in forward_token per call."""
    host = torch.empty(1, dtype=torch.long, pin_memory=True)
    logits = gm.forward([5], layers)
    spent = 0.0
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        token = torch.argmax(logits)
        host.copy_(token.view(1), non_blocking=True)
        h0 = time.perf_counter()
        logits = gm.forward_token(token, layers)
        spent += time.perf_counter() - h0
        for layer in layers:  # stay at one position: the same work each step
            layer.crop(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / n, spent * 1e6 / n


def prefilled(shape: str, capacity: int) -> tuple:
    """The shape's model, its GPU model and cache layers holding a 128-token prompt."""
    model = build(shape, capacity)
    gm = gpu_model(model, capacity)
    layers = gm.new_layers()
    with torch.inference_mode():
        gm.forward(tokens(128, 1), layers)
    return model, gm, layers


def _use(mode: tuple[str, int, int]) -> str:
    """Set triton_pdl's (MODE, PREFETCH, AHEAD) to `mode` (before a graph is captured); its key
    in a row, MODE:PREFETCH:AHEAD."""
    P.MODE, P.PREFETCH, P.AHEAD = mode
    return ":".join(map(str, mode))


def shape_row(shape: str, modes: list[tuple[str, int, int]], capacity: int) -> dict:
    model, gm, layers = prefilled(shape, capacity)
    row: dict = {"shape": shape}
    with torch.inference_mode():
        gm.forward([5], layers)
        layers_pos = layers[0].get_seq_length()
        b = gm._buffers(1)
        ref = None
        for mode in modes:
            key = _use(mode)
            gm._graphs.clear()
            for layer in layers:
                layer.crop(layers_pos - 1 - layer.get_seq_length())
            b["ids"].fill_(7)
            b["pos"].fill_(layers_pos - 1)
            graph = gm._graph(b, layers)
            graph.replay()
            got = b["logits"].clone()
            ref = got if ref is None else ref
            row[key] = {"us": round(replay_us(graph), 1), "same": torch.equal(got, ref)}
        _use(modes[0])
        gm._graphs.clear()
        for layer in layers:
            layer.advance(layers_pos)
        dev, host = engine_like_us(gm, layers)
        row["engine_loop_us"], row["host_forward_token_us"] = round(dev, 1), round(host, 1)
    for mode in modes:  # through the engine, each mode's graph captured before its timing
        key = _use(mode)
        gm._graphs.clear()
        kvrepl_decode(gm, tokens(128, 2), 8)
        row[key]["engine_tok_s"] = statistics.median(kvrepl_decode(gm, tokens(128, 2), 128)
                                                     for _ in range(3))  # fmt: skip
    _use(modes[0])
    del gm, model
    torch.cuda.empty_cache()
    return row


def tiles(shape: str) -> list[dict]:
    import functools
    import itertools

    from gpu_tune import SHAPES, graphed_us

    from kvrepl.backends.gpu import triton_ops as T

    rows = []
    for name, (n, k, glu) in SHAPES[shape].items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
              for _ in range(max(2, min(48, 200_000_000 // (n * k * 2))))]  # fmt: skip
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16)
        bk, times, first, same = T._bk(n, k), {}, None, True
        for bn, warps, stages in itertools.product((16, 32, 64), (2, 4, 8), (3, 5)):
            cfg = (bn, bk, warps, stages)
            try:
                calls = [functools.partial(T._launch, x, w, out, None, glu, None, cfg=cfg)
                         for w in ws]  # fmt: skip
                times[cfg] = graphed_us(calls)
            except Exception:  # noqa: BLE001, S112 - a config that does not fit
                continue
            T._launch(x, ws[0], out, None, glu, None, cfg=cfg)
            first = out.clone() if first is None else first
            same &= torch.equal(first, out)
        now = T._config(n, k, glu, 1)
        best = sorted(times, key=times.get)[:3]
        rows.append({"weight": f"{shape}.{name}", "mb": n * k * 2 / 1e6,
                     "now": [now, round(times.get(now, -1), 2)],
                     "best": [[c, round(times[c], 2)] for c in best], "same": same})  # fmt: skip
        del ws
    return rows


ABLATE = {  # what to leave out: (module, attribute, stand-in), triton_ops ("T") or triton_attn
    "norms": [("T", "rmsnorm", lambda x, w, eps, out, **k: out)],
    "attention": [("T", "attention", lambda q, kc, vc, pos, att, *rest, **k: att)],
    "combine": [("A", "_attn_combine", None)],  # None: a kernel whose launches do nothing
    "matmuls": [("T", "matmul", lambda x, w, out, *a, **k: out),
                ("T", "matmul_rope", lambda x, w, q, *a, **k: q)],
}


class _NoLaunch:
    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *a, **k: None


def ablate(shape: str, capacity: int) -> dict:
    """The step's replay time with each kind of kernel left out, against the whole step."""
    from kvrepl.backends.gpu import triton_attn as A
    from kvrepl.backends.gpu import triton_ops as T

    model, gm, layers = prefilled(shape, capacity)
    row: dict = {"shape": shape}
    with torch.inference_mode():
        b = gm._buffers(1)
        b["ids"].fill_(7)
        b["pos"].fill_(layers[0].get_seq_length())
        for name in ["none", *ABLATE, "none again"]:  # the whole step first and last: drift
            saved = []
            for key, attr, stand_in in ABLATE.get(name, []):
                mod = {"T": T, "A": A}[key]
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, stand_in or _NoLaunch())
            try:
                gm._graphs.clear()
                row[name] = round(replay_us(gm._graph(b, layers)), 1)
            finally:
                for mod, attr, value in saved:
                    setattr(mod, attr, value)
    del gm, model
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="135M,1B,8B")
    ap.add_argument("--modes", default="late:1024:0,late:1024:24",
                    help="MODE:PREFETCH[:AHEAD_MB], the first is the one the engine rows use "
                    "(triton_pdl's settings)")  # fmt: skip
    ap.add_argument("--capacity", type=int, default=CAPACITY, help="the cache's positions")
    ap.add_argument("--tiles", default=None, help="shapes whose decode tiles to sweep")
    ap.add_argument("--ablate", default=None, help="shapes whose step to time without each kind")
    args = ap.parse_args()
    if args.ablate:
        for shape in args.ablate.split(","):
            print(json.dumps(ablate(shape, args.capacity)), flush=True)
        return 0
    if args.tiles:
        for shape in args.tiles.split(","):
            for r in tiles(shape):
                print(json.dumps(r), flush=True)
        return 0
    modes = [(f[0], int(f[1]), int(f[2]) if len(f) > 2 else P.AHEAD)
             for f in (s.split(":") for s in args.modes.split(","))]  # fmt: skip
    print(json.dumps({"gpu": torch.cuda.get_device_name()}), flush=True)
    for shape in args.shapes.split(","):
        print(json.dumps(shape_row(shape, modes, args.capacity)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
