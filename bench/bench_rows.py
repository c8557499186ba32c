#!/usr/bin/env python
"""What a verified row costs on the CPU, matrix by matrix: for each matrix of the embedded model
(one layer's, and the head), the time of a matmul over 1 row and over 16, and the products a
second..16th row runs per second; then the whole model's matrices, and a whole forward of 1..17
rows (a decode step and a verification of 0..16 drafted tokens) in decode steps.

    flock -x /work/cpu.lock .venv/bin/python bench/bench_rows.py

One layer's matrices fit in the caches, so their figures are compute alone; the forward's are
what drafting pays. This machine's speed moves between runs (another tenant's load): compare
figures of one run. Writes nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cpu import cpu_name  # noqa: E402

from kvrepl.engine import models  # noqa: E402


def forward_rows(fm, context: int = 150, reps: int = 25) -> None:
    """A forward of m rows after `context` tokens, best of `reps` (interleaved), in steps."""
    ids = list(range(1000, 1000 + context))
    layers = fm.new_layers()
    fm.forward(ids, layers)
    best = dict.fromkeys(range(1, 18), 1e9)
    for _ in range(reps):
        for m in best:
            t = time.perf_counter()
            fm.forward(ids[:m], layers, all_logits=m > 1)
            best[m] = min(best[m], time.perf_counter() - t)
            for layer in layers:
                layer.crop(context - layer.get_seq_length())
    step = best[1]
    print(f"\na forward after {context} tokens: a step {step * 1e3:.2f} ms; a verification of k "
          "drafted tokens, a row's cost in steps:")
    print(", ".join(f"{m - 1}: {(best[m] / step - 1) / (m - 1):.2f}" for m in best if m > 1))


def main() -> int:
    fm = models.load(progress=False).model
    layer = fm.layers[0]
    mats = {"qkv": layer.qkv[0][0], "o": layer.o, "gate_up": layer.gate_up[0][0],
            "down": layer.down, "head": fm.lm_head}  # fmt: skip
    threads = torch.get_num_threads()
    print(f"CPU: {cpu_name()}; threads {threads}; {fm.describe()}\n")
    print("| matrix | weights | 1 row | 16 rows | a row past the first | G products/s a row |")
    print("|---|---|---:|---:|---:|---:|")
    total = {1: 0.0, 16: 0.0}
    products = 0
    for name, p in mats.items():
        desc = fm._desc(p)

        def best(m: int, p=p, desc=desc) -> float:
            x, out = torch.randn(m, p.k), torch.empty(m, p.n)
            ts = []
            for _ in range(40):
                t = time.perf_counter()
                fm.k.matmul(x.data_ptr(), m, p.k, desc, out.data_ptr(), p.n, None, 0)
                ts.append(time.perf_counter() - t)
            return min(ts)

        t1, t16 = best(1), best(16)
        times = 1 if name == "head" else len(fm.layers)
        total[1] += t1 * times
        total[16] += t16 * times
        products += p.n * p.k * times
        row = (t16 - t1) / 15
        print(f"| {name} | {p.fmt} {p.n}x{p.k} | {t1 * 1e6:.0f} us | {t16 * 1e6:.0f} us | "
              f"{row * 1e6:.1f} us | {p.n * p.k / row / 1e9:.1f} |")  # fmt: skip
    row = (total[16] - total[1]) / 15
    print(f"\nthe model's matrices: a row past the first {row * 1e3:.3f} ms, "
          f"{products / row / 1e9:.1f} G products/s over {threads} threads")
    forward_rows(fm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
