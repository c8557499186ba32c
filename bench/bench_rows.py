#!/usr/bin/env python
"""What a verified row costs on the CPU, against what the instructions allow: for each matrix of
the embedded model (one layer's, and the head), the time of a matmul over 1 row and over 16, and
the products a second..16th row runs per second; against the rate of back-to-back `vpdpwssd`
(16-bit multiply-adds, 32 products an instruction, the kernels' inner instruction) and
`vpdpbusd` (8-bit, 64 products) on this CPU, from a loop of nothing else compiled here.

    flock -x /work/cpu.lock .venv/bin/python bench/bench_rows.py

The matrices run warm (one layer's fit in the caches), so a row's figure is its compute alone.
Needs a C compiler with AVX-512 VNNI (else prints only the matrices). Writes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cpu import cpu_name  # noqa: E402

from kvrepl.engine import models  # noqa: E402

PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(void) {
    __m512i a[12], w = _mm512_set1_epi16(3), x = _mm512_set1_epi16(5);
    long n = 200000000 / 12;
    for (int kind = 0; kind < 2; kind++) {
        for (int i = 0; i < 12; i++) a[i] = _mm512_set1_epi32(i);
        double t = now();
        for (long r = 0; r < n; r++)
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) {
                a[i] = kind ? _mm512_dpbusd_epi32(a[i], w, x) : _mm512_dpwssd_epi32(a[i], w, x);
                __asm__ volatile("" : "+v"(a[i]));
            }
        t = now() - t;
        long s = 0;
        for (int i = 0; i < 12; i++) s += _mm512_reduce_add_epi32(a[i]);
        printf("%s %.4f %ld\n", kind ? "vpdpbusd" : "vpdpwssd", n * 12 / t / 1e9, s & 1);
    }
    return 0;
}
"""


def peaks() -> dict[str, float]:
    """G instructions/s of each, one core."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "peak.c", Path(d) / "peak"
        src.write_text(PEAK_C)
        built = subprocess.run(["cc", "-O2", "-march=native", str(src), "-o", str(exe)],
                               capture_output=True, text=True)  # fmt: skip
        if built.returncode:
            return {}
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines()}


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
    for name, g in peaks().items():
        per = 32 if name == "vpdpwssd" else 64
        print(f"{name} back to back: {g:.2f} G/s a core, {g * per * threads:.1f} G products/s "
              f"over {threads} cores")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
