"""Where a model computes and in which dtype: what `--device` may name, which device `auto`
picks (the CPU without importing torch on a machine with no NVIDIA driver, so the prompt comes
before torch loads), whether `auto` spreads a model over several GPUs, and the torch dtype a
`--dtype` means there. Never loads a model.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from kvrepl.config import OPTIONS
from kvrepl.errors import ModelError, UsageError

# "gguf": the CPU fast path, the file's own quantized weights (the default for a .gguf on the CPU)
DTYPES: tuple[str, ...] = OPTIONS["dtype"].choices or ()


def check_device(device: str | None) -> None:
    """UsageError in one line for a --device that names no device kvrepl can use."""
    if device and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"device {device!r}: use auto, cpu, cuda or cuda:N (a GPU's number)")


def _no_gpu_here() -> bool:
    """No NVIDIA driver on this machine: `--device auto` is the CPU, said without importing
    torch (a second before the prompt)."""
    return "torch" not in sys.modules and sys.platform == "linux" and not (
        os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
    )


def pick_device(device: str | None = None) -> str:
    if device and device != "auto":
        return device
    if _no_gpu_here():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def spreads(device: str | None) -> bool:
    """Whether `--device auto` spreads the model over the GPUs (there are several)."""
    if device not in (None, "", "auto"):
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype in ("auto", "gguf"):
        # fp32 on the CPU: bf16 snapshots changed greedy output at 6k tokens in our checks.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
