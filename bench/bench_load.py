#!/usr/bin/env python
"""A GGUF file's load on the CPU: the weights' preparation (the blocks' values read and put in the
kernels' layout) by repack.c against the numpy and torch reference it replaced, tensor by tensor
in one process; then `models.load` whole (imports, tokenizer, weights) and llama.cpp's load of
the same file, each in a fresh process. Files: the embedded model and bench_bandwidth's 1B
shapes of random weights (Q4_K_M's mix, IQ4_XS; written on first use, ~1 min each).

    flock -x /work/cpu.lock .venv/bin/python bench/bench_load.py [--runs 3]

Page cache warm throughout (each file is read once before timing): what a second start costs,
the disk left out; resident memory (RSS) after the load and at its peak, torch's and Python's
own included, once a token has been computed (every weight read). Writes nothing but the 1B
files; prints a markdown table with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_bandwidth import GGUF_1B_KM, GGUF_1B_XS, write_1b  # noqa: E402
from bench_cpu import cpu_name  # noqa: E402


def prepare(path: str, c: bool) -> float:
    """Seconds to read and lay out every 2-D tensor of the file: repack.c's way (c) or the
    reference's (numpy's values, lanes.py's torch layout)."""
    from kvrepl.backends.cpu import native
    from kvrepl.backends.cpu.gguf_model import GGUFTensors
    from kvrepl.engine.models import cache_dir

    kernels = native.kernels(cache_dir())
    f = GGUFTensors(Path(path), kernels if c else None)
    t = time.perf_counter()
    for name, (qtype, dims, _) in f.by_name.items():
        if len(dims) == 2 and qtype != "F32":
            f.packed(name).interleaved(kernels=kernels if c else None)
    return time.perf_counter() - t


def memory() -> tuple[int, int]:
    """This process's resident memory now and at its peak, MB (/proc/self/status)."""
    f = dict(ln.split(":", 1) for ln in open("/proc/self/status") if ln.startswith("Vm"))
    return int(f["VmRSS"].split()[0]) // 1024, int(f["VmHWM"].split()[0]) // 1024


def whole(path: str) -> tuple[float, int, int]:
    t = time.perf_counter()
    from kvrepl.engine import models

    lm = models.load(path, progress=False)
    took = time.perf_counter() - t
    lm.model.forward([1], lm.model.new_layers())  # one token: every weight read once
    return (took, *memory())


def llama_cpp(path: str) -> tuple[float, int, int] | None:
    t = time.perf_counter()
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, verbose=False)
    took = time.perf_counter() - t
    llm.eval([1])  # one token: every weight read once (its mapped file pages resident)
    return (took, *memory())


def child(what: str, path: str) -> None:
    fn = {"c": lambda: (prepare(path, True), 0, 0), "torch": lambda: (prepare(path, False), 0, 0),
          "whole": lambda: whole(path), "llama.cpp": lambda: llama_cpp(path)}[what]  # fmt: skip
    print(json.dumps(fn()))


def timed(what: str, path: Path, runs: int) -> tuple[float, int, int] | None:
    """The best time of `runs` fresh processes, with that run's resident memory after the load
    and at its peak (MB)."""
    best = None
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--child", what, str(path)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        s = json.loads(out.stdout.strip().splitlines()[-1])
        if s is not None and (best is None or s[0] < best[0]):
            best = tuple(s)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from kvrepl.engine.models import embedded_gguf

    files = {"135M (embedded) Q4_1+Q8_0": embedded_gguf(), "1B Q4_K_M": GGUF_1B_KM,
             "1B IQ4_XS": GGUF_1B_XS}  # fmt: skip
    for name, path in files.items():
        if not path.exists():
            write_1b(path, "Q4_K_M" if "K_M" in name else "IQ4_XS")
        path.read_bytes()  # into the page cache
    print(f"CPU: {cpu_name()}; best of {args.runs} fresh processes each, page cache warm\n")
    print("| file | MB | weights laid out: reference (numpy + torch) | repack.c | speed-up "
          "| models.load whole | its memory after, peak | llama.cpp load | its memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in files.items():
        ref, c = timed("torch", path, args.runs), timed("c", path, args.runs)
        load, cpp = timed("whole", path, args.runs), timed("llama.cpp", path, args.runs)
        cpp_s = (f"{cpp[0]:.2f} s | {cpp[1]:,} MB, {cpp[2]:,} MB" if cpp is not None
                 else "not installed | -")  # fmt: skip
        print(f"| {name} | {path.stat().st_size / 1e6:,.0f} | {ref[0]:.2f} s | {c[0]:.2f} s | "
              f"{ref[0] / c[0]:.1f}x | {load[0]:.2f} s | {load[1]:,} MB, {load[2]:,} MB | "
              f"{cpp_s} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
