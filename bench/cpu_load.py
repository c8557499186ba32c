"""How busy other processes keep this machine's cores: the benchmarks record it beside every
measurement (the machine is shared), and wait for quiet before measuring; and a spinning process
that keeps a core busy on purpose (bench_busy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def busy_s() -> float:
    """CPU seconds all processes have used (user+nice+system+irq+softirq+steal)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / _TICK


_HELPERS: set[int] = set()


def count_as_own(pid: int) -> None:
    """A helper process of this benchmark (cpp_worker's llama.cpp): its CPU time is the
    benchmark's own, not another process's."""
    _HELPERS.add(pid)


def own_s() -> float:
    """CPU seconds this process and its helpers have used (a helper gone is dropped)."""
    s = time.process_time()
    for pid in list(_HELPERS):
        try:  # /proc/PID/stat: utime and stime are fields 14 and 15, 11 and 12 after the name
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            s += (int(f[11]) + int(f[12])) / _TICK
        except (OSError, IndexError, ValueError):
            _HELPERS.discard(pid)
    return s


class Others:
    """How many cores other processes (and the hypervisor's steal) used since creation."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), busy_s(), own_s()

    def cores(self) -> float:
        dt = time.perf_counter() - self.t
        other = (busy_s() - self.busy) - (own_s() - self.own)
        return max(0.0, other / dt) if dt > 0 else 0.0


class Spinner:
    """`cores` processes that each keep a core busy (a pure-Python loop), for a `with` block."""

    def __init__(self, cores: int = 1) -> None:
        self.cores = cores
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Spinner:
        code = "while True:\n    pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.cores)]
        time.sleep(0.3)  # running before the measurement starts
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
