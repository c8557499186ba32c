#!/usr/bin/env python
"""A paired A/B of CPU decode between two trees of kvrepl: one process a tree, each holding
bench_bandwidth.py's models (the embedded 135M, the 1B shapes), asked in turn, round after
round (the order alternating), for the best decode rate of a few steps at ~100 tokens; prints
each model's medians and the median of the per-round ratios (B / A). On a shared machine
whose speed drifts by 10-20%, a ratio of rounds taken seconds apart says more than two runs.

    flock -x /work/cpu.lock .venv/bin/python bench/ab_decode.py /tmp/old . --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NAMES = ("135M", "1B", "1B Q4_K_M", "1B IQ4_XS")


def child(tree: str) -> None:
    sys.path.insert(0, str(Path(tree).resolve()))
    sys.path.insert(0, str(BENCH))
    import bench_bandwidth as bb

    got = bb.kvrepl_models(2)
    print("READY " + got["kvrepl"], flush=True)
    for line in sys.stdin:
        name, ctx = line.rsplit(None, 1)
        print("R " + json.dumps(bb.kvrepl_measure(got[name], 1, int(ctx))["tok_s"]), flush=True)


def ask(p: subprocess.Popen, line: str) -> float:
    p.stdin.write(line + "\n")
    p.stdin.flush()
    while not (got := p.stdout.readline()).startswith("R "):
        if not got:
            raise SystemExit("a tree's process ended")
    return json.loads(got[2:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    procs = []
    for tree in (args.a, args.b):
        p = subprocess.Popen([sys.executable, __file__, "x", "x", "--child", tree], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tree)  # fmt: skip
        while not (line := p.stdout.readline()).startswith("READY"):
            if not line:
                raise SystemExit(f"{tree}: its process ended")
        print(f"{'AB'[len(procs)]}: {line[6:].strip()}", flush=True)
        procs.append(p)
    rates = {(n, i): [] for n in NAMES for i in (0, 1)}
    for r in range(args.rounds):
        for n in NAMES:
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                rates[(n, i)].append(ask(procs[i], f"{n} 100"))
    for n in NAMES:
        a, b = rates[(n, 0)], rates[(n, 1)]
        ratio = [y / x for x, y in zip(a, b, strict=True)]
        print(f"{n:10s} A median {statistics.median(a):6.1f} tok/s, B {statistics.median(b):6.1f};"
              f" B / A by round: median {statistics.median(ratio):.3f} ({min(ratio):.2f}-"
              f"{max(ratio):.2f})")  # fmt: skip
    for p in procs:
        p.stdin.close()
        p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
