"""The per-layer K/V buffer every backend writes into: `GrowingLayer`, a full-attention
cache layer with room reserved ahead, written by index and cut back by a length change.
The engine's prompt cache (engine/cache.py) holds a list of them and owns what they
hold; the backends (cpu/, gpu/, the transformers fallback) fill them. No policy here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

_GROW_STEP = 256  # positions reserved ahead; growth rounds up to this


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that grows in place: room is reserved ahead and new K/V are
    written by index, so a decode step does not copy the whole cache (DynamicLayer's torch.cat
    does, and at 6k tokens that copy was 70% of each step). `keys`/`values` are views of the
    filled part, made when read, so the rest of transformers reads them as usual."""

    moves = 0  # counts every (re)allocation or drop of any layer's buffers (fastmodel.py binds)

    def __init__(self, limit: int | None = None, **kwargs: Any) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        super().__init__()
        self.limit = limit  # fixed capacity: the buffers are made at this size and never move

    # keys/values: views of the filled part, made when read (a decode step moves every layer's
    # length; making 2 views per layer there cost ~90 us a token for 30 layers). Set (None, or
    # what transformers' offload, reorder and select put back: the filled part), it is the buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return self._k[..., : self._n, :] if self._k is not None else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._buffers(value, self._v)

    @property
    def values(self) -> torch.Tensor | None:
        return self._v[..., : self._n, :] if self._v is not None else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._buffers(self._k, value)

    def _buffers(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """The K and V buffers are these now (None: dropped)."""
        self._k, self._v = k, v
        GrowingLayer.moves += 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True
        self._buffers(
            key_states.new_empty(_shape(key_states, 0)),
            value_states.new_empty(_shape(value_states, 0)),
        )

    def _reserve(self, need: int) -> None:
        assert self._k is not None and self._v is not None
        cap = self._k.shape[-2]
        if need <= cap:
            return
        if self.limit is not None and cap:
            raise ValueError(f"a fixed cache holds {cap:,} positions, not {need:,}")
        new_cap = -(-max(need, cap + cap // 2) // _GROW_STEP) * _GROW_STEP
        if self.limit is not None:
            new_cap = max(need, self.limit)
        k, v = (
            self._k.new_empty(_shape(self._k, new_cap)),
            self._v.new_empty(_shape(self._v, new_cap)),
        )
        k[..., : self._n, :] = self._k[..., : self._n, :]
        v[..., : self._n, :] = self._v[..., : self._n, :]
        self._buffers(k, v)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._n + key_states.shape[-2]
        self._reserve(end)
        self._k[..., self._n : end, :] = key_states
        self._v[..., self._n : end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def extend(
        self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], device: Any = None
    ) -> None:
        """These (keys, values) parts follow the positions the layer holds: one copy each, into
        buffers (on `device`) with room to grow, so the next turn copies nothing again."""
        k0, v0 = parts[0]
        if not self.is_initialized:
            device = device or k0.device
            self.lazy_initialization(k0[..., :0, :].to(device), v0[..., :0, :].to(device))
        pos = self._n
        n = pos + sum(k.shape[-2] for k, _ in parts)
        self._reserve(n if self.limit is not None else n + max(_GROW_STEP, n // 4))
        for k, v in parts:
            end = pos + k.shape[-2]
            self._k[..., pos:end, :].copy_(k)
            self._v[..., pos:end, :].copy_(v)
            pos = end
        self._set_length(n)

    def room(self, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers [1, heads, capacity, head_dim], with room for `need` positions, for
        a kernel that writes new K/V past the filled length (then `advance`)."""
        self._reserve(need)
        assert self._k is not None and self._v is not None
        return self._k, self._v

    def advance(self, n: int) -> None:
        """The kernel has written positions up to n: they are part of the cache now."""
        self._set_length(n)

    def _set_length(self, n: int) -> None:
        self._n = n

    def get_seq_length(self) -> int:
        return self._n

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self._set_length(max(0, self._n + tokens_to_remove))

    def reset(self) -> None:
        self._buffers(None, None)
        self._n = 0
        self.is_initialized = False


def _shape(t: torch.Tensor, length: int) -> tuple[int, ...]:
    return (*t.shape[:-2], length, t.shape[-1])
