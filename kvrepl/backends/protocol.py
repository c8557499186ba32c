"""The backend protocol: what the engine runs a model through when kvrepl computes it with its
own kernels (the CPU fast path, the GPU path), with its capabilities declared on the class, so
that callers read a flag and never probe with hasattr. A transformers model is the other kind of
backend: the engine wraps it (runners.HFRunner), and it declares the same flags there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class KernelBackend(ABC):
    """A decoder on kvrepl's kernels. `forward(ids, layers)` appends the ids' K/V to the cache
    layers (made by `new_layers`) and returns the last position's logits (float32)."""

    # A position's K/V and logits do not depend on how many positions are computed with it:
    # reuse equals recomputation bit for bit, and verified drafts equal plain decoding.
    batch_invariant: bool = True
    # forward_token(token, layers): a token still on the device is fed, queued behind the step
    # that chose it (the host reads it while the next step runs).
    feeds_ahead: bool = False
    # the last forward did one-time work (captured a CUDA graph): its time is no forward's cost
    warming: bool = False
    config: Any
    device: torch.device
    kv_dtype: torch.dtype
    context_length: int

    @abstractmethod
    def new_layers(self) -> list[Any]:
        """Empty cache layers for this model."""

    @abstractmethod
    def forward(self, ids: list[int], layers: list[Any], all_logits: bool = False) -> torch.Tensor:
        """Append the ids' K/V to `layers`; the last position's logits, or with `all_logits`
        every position's (what a verification of drafts needs, where batch_invariant)."""

    @abstractmethod
    def describe(self) -> str:
        """How this model computes (weights, kernels, K/V), for /stats."""
