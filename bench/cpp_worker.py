#!/usr/bin/env python
"""llama.cpp (llama-cpp-python) for the benchmarks, in a process of its own: nothing of kvrepl or
torch beside it. They would share its OpenMP runtime (one libgomp.so.1 per process), which
kvrepl's kernels tell to spin less (pool.c's `quiet_openmp`): llama.cpp's OpenMP threads then
sleep at every barrier of its graph, and the embedded model decoded at 57 tok/s instead of
105-110 on this project's Zen 4 (2 cores). `Alone` is llama.cpp in the calling process (call it
where no kvrepl kernel runs); `Worker` runs it in a child process, served one JSON request a line.

    python bench/cpp_worker.py GGUF THREADS      # the child: reads requests on stdin
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class Alone:
    """llama.cpp in this process, with the benchmarks' settings (n_ctx 8192, batches of 512)."""

    def __init__(self, gguf: str | Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=8192, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)  # fmt: skip

    def prefill(self, ids: list[int]) -> float:
        """Seconds to evaluate ids from an empty cache."""
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> dict[str, Any]:
        """n greedy tokens after ids (the cache's common prefix kept): (time, tokens so far) at
        each token, as bench_engine.rates takes them (perf_counter, this process's), and the
        tokens."""
        stamps, tokens = [], []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(int(tok))
            stamps.append((time.perf_counter(), len(tokens)))
            if len(tokens) >= n:
                break
        return {"stamps": stamps, "tokens": tokens}


class Worker:
    """`Alone` in a child process: the same calls, answered over a pipe."""

    def __init__(self, gguf: str | Path, threads: int) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), str(gguf), str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(self.close)
        self._read()  # ready: the model is loaded

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp's worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def _call(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([op, *args]) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def prefill(self, ids: list[int]) -> float:
        return self._call("prefill", ids)

    def decode(self, ids: list[int], n: int) -> dict[str, Any]:
        return self._call("decode", ids, n)

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()


def main() -> int:
    replies = os.fdopen(os.dup(1), "w")  # the pipe; anything else printed goes to stderr
    os.dup2(2, 1)
    cpp = Alone(sys.argv[1], int(sys.argv[2]))
    print(json.dumps("ready"), file=replies, flush=True)
    for line in sys.stdin:
        op, *args = json.loads(line)
        print(json.dumps(getattr(cpp, op)(*args)), file=replies, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
