"""How the GPU path's kernels follow one another: programmatic dependent launch (PDL, Hopper on)
and the L2 prefetch of a matmul's weights that it allows. Owns the mode (read from the
environment at import, and changeable at run time by the benchmarks before a graph is captured)
and the three device helpers the kernels call; not the kernels themselves (triton_ops.py,
triton_attn.py).

A kernel launched with PDL is scheduled while the one before it ends, and waits on the GPU
(`wait_for_previous`) before it reads an activation or writes anything; meanwhile a matmul
prefetches the first columns of its weight rows into L2, since weights never depend on the
kernel before. Modes (KVREPL_GPU_PDL):
- "late" (the default): each kernel lets the next be scheduled only once its own main loop is
  done (`next_may_start` after the loop), so the next one's programs take the SMs its programs
  leave and, in a layer at most SMALL wide, fetch their weights while the last ones finish;
- "early": the next kernel is scheduled as soon as this one starts (its programs wait on the
  SMs), only for layers at most SMALL wide;
- "0": plain launches.
KVREPL_GPU_PREFETCH: how many of a weight row's first columns to prefetch (0: none).
Measured on an H100 (`python bench/gpu_step.py --capacity 4096`, the decode step's graph,
2026-12-06), late with prefetch / late / early / plain: 135M 698 / 759 / 763 / 856 us, 1B
1,145 / 1,141 / 1,187 / 1,180, 8B 5,536 / 5,539 / 5,621 / 5,625. The prefetch pays only where
latency, not bandwidth, bounds a kernel (with the RMSNorm fused into the matmuls, an attempt
since undone, it cost 4-5% at 1B and 8B), so it is kept to layers at most SMALL wide. A second
attempt at fewer kernels (12263b8, reverted: the norm fused only where layers are at most SMALL
wide, and the attention's splits combined by the last program to finish, on a counter) was
slower too on an H100 (gpu_step.py, 2026-12-07): 135M 989 us against 699, 1B 1,205 against
1,178. Under PDL a launch costs less than a round of dependent loads or a serial combine.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

SMALL = 1536  # widest layer that is latency-bound (SmolLM2-135M's shapes; 1B is not)
MODE = os.environ.get("KVREPL_GPU_PDL", "late")
PREFETCH = int(os.environ.get("KVREPL_GPU_PREFETCH", "1024"))
# MB of the next matmul's weights that the norm or the attention before it asks into L2, from
# programs of their own (the memory is idle while those latency-bound kernels run); 0: none, the
# default until timed on a GPU (`bench/gpu_step.py --modes late:1024:0,late:1024:24`)
AHEAD = int(os.environ.get("KVREPL_GPU_AHEAD_MB", "0"))
AHEAD_ROWS = 32  # only for steps of at most this many rows (decode, drafts' verification)
LINE = 128  # bytes an L2 prefetch brings
OFF, EARLY, LATE = 0, 1, 2  # the kernels' PDL constexpr


@functools.cache
def _hopper() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def mode(width: int) -> int:
    """The PDL constexpr for a kernel over rows `width` wide (OFF, EARLY or LATE)."""
    if MODE in ("0", "off") or not _hopper():
        return OFF
    if MODE == "early":
        return EARLY if width <= SMALL else OFF
    return LATE


def ahead(w: torch.Tensor | None, rows: int, pdl: int) -> tuple[torch.Tensor, int, int]:
    """(the weight's bytes, lines to prefetch, programs to prefetch them) for a kernel of `rows`
    rows launched with `pdl` before the matmul over `w` (a tensor or qweights.QWeight: its
    quants, not their scales); no lines where AHEAD is 0, the rows are many, or the kernel is
    not chained by PDL (which lets its programs start while the kernel before runs)."""
    if w is None or AHEAD <= 0 or rows > AHEAD_ROWS or pdl == OFF:
        return _NONE, 0, 0
    q = getattr(w, "q", w)
    lines = min(q.numel() * q.element_size(), AHEAD << 20) // LINE
    return q, lines, sms()


_NONE = torch.empty(0)


@functools.cache
def sms() -> int:
    """The GPU's multiprocessors (an H100's 132 where there is no GPU: the CPU tests' tiles)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@triton.jit
def prefetch_share(base, lines, p, programs, BLOCK: tl.constexpr):
    """Program p of `programs`: ask its share of the `lines` 128-byte lines from base into L2."""
    per = tl.cdiv(lines, programs)
    end = tl.minimum(p * per + per, lines)
    for i in range(p * per, end, BLOCK):
        at = i + tl.arange(0, BLOCK)
        line = tl.where(at < end, at, i).to(tl.int64)
        prefetch_l2(base.to(tl.pointer_type(tl.int8)) + line * 128)


def prefetch_columns(k: int, pdl: int) -> int:
    """PF: a power of two of at least 64 columns, at most k and PREFETCH; 0 for none."""
    if pdl != LATE or PREFETCH < 64 or k < 64 or k > SMALL:
        return 0
    return 1 << (min(PREFETCH, k).bit_length() - 1)


@triton.jit
def next_may_start():
    """The next kernel may be scheduled now (it waits, in wait_for_previous, before it reads
    anything this one writes)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def wait_for_previous():
    """Until the kernel before (and so every kernel before it) has finished and its writes are
    visible: every PDL kernel calls it before its first read of activations or cache, and
    before its first write."""
    tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at `ptrs` to be brought into L2 (a hint: nothing waits)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                              [ptrs.to(tl.int64)], dtype=tl.int32, is_pure=False,
                              pack=1)  # fmt: skip
