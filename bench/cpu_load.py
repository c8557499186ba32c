"""How busy other processes keep this machine's cores: the benchmarks record it beside every
measurement (the machine is shared), and wait for quiet before measuring."""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def busy_s() -> float:
    """CPU seconds all processes have used (user+nice+system+irq+softirq+steal)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / _TICK


class Others:
    """How many cores other processes (and the hypervisor's steal) used since creation."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), busy_s(), time.process_time()

    def cores(self) -> float:
        dt = time.perf_counter() - self.t
        other = (busy_s() - self.busy) - (time.process_time() - self.own)
        return max(0.0, other / dt) if dt > 0 else 0.0
