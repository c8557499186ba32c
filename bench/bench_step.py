#!/usr/bin/env python
"""What the engine adds to a CPU decode step: the embedded 135M model's greedy decode through
`Engine.stream` (drafting off) beside the model's own forward, per token.

For each --tree (a kvrepl checkout, in its own process): the ms per token of the whole decode
(--tokens greedy tokens after a ~100-token prompt, the first token's time left out), the ms of
the model's forwards in it (timed around FastModel.forward), and the difference: the engine's
own work per token (sampling, detokenizing, events, cache bookkeeping). Best of --reps runs.

    flock -x /work/cpu.lock .venv/bin/python bench/bench_step.py --tree /tmp/old --tree .
    ... bench/bench_step.py --profile       # this tree: cProfile of one decode, top functions
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(tree: str, tokens: int, reps: int, profile: bool) -> None:
    sys.path.insert(0, tree)
    sys.path.insert(0, str(Path(tree) / "bench"))
    import bench_engine as be

    import kvrepl
    from kvrepl.chat.prompt import Prompt
    from kvrepl.engine import models
    from kvrepl.engine.engine import Engine, Sampling

    assert str(Path(kvrepl.__file__).resolve()).startswith(str(Path(tree).resolve()))
    lm = models.load(progress=False)
    ids = be.decode_prompt(Prompt(lm.tokenizer), 100)
    eng = Engine(lm.model, lm.tokenizer, end_ids=set(), context_length=lm.context_length)
    fm, spent = lm.model, [0.0]
    forward = fm.forward

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    fm.forward = timed
    sampling = Sampling(temperature=0, repetition_penalty=1.0, max_tokens=tokens, draft=False)

    def decode() -> tuple[float, float, list[int]]:
        eng.prefill(ids)
        stamps: list[float] = []
        for _ev in eng.stream(ids, sampling):
            if not stamps and eng.progress.generated:
                stamps.append(time.perf_counter())
                spent[0] = 0.0
        took = time.perf_counter() - stamps[0]
        n = len(eng.progress.generated) - 1
        return took / n, spent[0] / n, list(eng.progress.generated)

    decode()  # warm
    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        decode()
        pr.disable()
        pstats.Stats(pr, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    runs = [decode() for _ in range(reps)]
    best = min(runs, key=lambda r: r[0])
    assert all(r[2] == runs[0][2] for r in runs)
    print("RESULT " + json.dumps({"kvrepl": kvrepl.__file__, "per_token": best[0],
                                  "forward": best[1], "tokens": runs[0][2][:8]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", action="append", help="a kvrepl checkout to measure (repeatable)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.tokens, args.reps, args.profile)
        return 0
    for tree in args.tree or [str(ROOT)]:
        cmd = [sys.executable, __file__, "--child", tree, "--tokens", str(args.tokens),
               "--reps", str(args.reps)] + (["--profile"] if args.profile else [])  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
        if args.profile:
            print(done.stderr[-6000:])
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{tree}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(line[7:])
        per, fwd = r["per_token"] * 1e3, r["forward"] * 1e3
        print(f"{r['kvrepl']}: {1e3 / per:6.1f} tok/s through the engine, {per:.3f} ms a token, "
              f"of which forward {fwd:.3f} ms, engine {per - fwd:.3f} ms "
              f"(first tokens {r['tokens']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
