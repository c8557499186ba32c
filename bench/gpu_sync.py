#!/usr/bin/env python
"""What one step of dependency costs on the GPU: a kernel boundary (the decode step's way: one
kernel after another in a CUDA graph, chained by PDL as triton_pdl chains them) against a
grid-wide barrier inside one persistent kernel (what a whole-step kernel would use instead).
Each step reads a share of a weight buffer (a layer's worth, spread over the programs) so that
the figure includes the memory's latency, not only the synchronisation.

    python bench/gpu_sync.py            # one JSON line per (way, bytes a step)

Prints microseconds per step: kernel boundaries as `chain`, barriers as `barrier`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kvrepl.backends.gpu import triton_pdl as P  # noqa: E402

STEPS = 240  # about a 135M decode step's kernels


@triton.jit
def _step(w, acc, per, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One kernel: after the one before, read this program's `per` values of w (a share of a
    layer) and add their sum into acc[pid] (a dependency on the kernel before)."""
    pid = tl.program_id(0)
    if PDL:
        P.wait_for_previous()
    s = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, per, BLOCK):
        s += tl.load(w + pid.to(tl.int64) * per + i + tl.arange(0, BLOCK)).to(tl.float32)
    prev = tl.load(acc + pid)
    if PDL:
        P.next_may_start()
    tl.store(acc + pid, prev + tl.sum(s, axis=0))


@triton.jit
def _persistent(w, acc, counter, per, steps, nprog, BLOCK: tl.constexpr, STRIDE):
    """Every step in one kernel: a program reads its share of the step's weights, then waits
    at a grid-wide barrier (an atomic count, spun on) before the next step."""
    pid = tl.program_id(0)
    total = tl.zeros((BLOCK,), tl.float32)
    for st in range(steps):
        base = w + (st % 8).to(tl.int64) * STRIDE + pid.to(tl.int64) * per
        for i in range(0, per, BLOCK):
            total += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        target = (st + 1) * nprog
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.store(acc + pid, tl.sum(total, axis=0))


def graphed_us(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Microseconds per replay of fn captured in a CUDA graph (gpu_tune's timer)."""
    import gpu_tune

    return gpu_tune.graphed_us([fn], reps)


def measure(sms: int, block: int, step_bytes: int) -> None:
    """Both ways at `step_bytes` of bf16 weights a step, each step's share of the programs."""
    per = max(block, (step_bytes // 2 // sms) // block * block) if step_bytes else block
    stride = per * sms
    w = torch.randn(8 * stride + per, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(sms, device="cuda", dtype=torch.float32)
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    for pdl in (0, 2):
        def chain(pdl: int = pdl) -> None:
            for st in range(STEPS):
                _step[(sms,)](w[(st % 8) * stride:], acc, per, BLOCK=block, PDL=pdl,
                              launch_pdl=pdl > 0, num_warps=4)  # fmt: skip

        us = graphed_us(chain)
        print(json.dumps({"way": "chain", "pdl": pdl, "step_mb": round(step_bytes / 2**20, 2),
                          "us_per_step": round(us / STEPS, 3)}), flush=True)  # fmt: skip

    def persistent() -> None:
        counter.zero_()
        _persistent[(sms,)](w, acc, counter, per, STEPS, sms, BLOCK=block, STRIDE=stride,
                            num_warps=4)  # fmt: skip

    us = graphed_us(persistent)
    print(json.dumps({"way": "barrier", "step_mb": round(step_bytes / 2**20, 2),
                      "us_per_step": round(us / STEPS, 3)}), flush=True)  # fmt: skip


def main() -> int:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "sms": sms}), flush=True)
    for step_bytes in (0, 1 << 20, 7 << 20):  # nothing, 1 MB, a 135M layer (7 MB) a step
        measure(sms, 512, step_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
