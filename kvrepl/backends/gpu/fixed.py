"""The GPU path's cache layers: reserved at the whole context and never moved, so a captured
CUDA graph keeps reading and writing the same buffers while the cache fills and is cut back.
Owns FixedLayer and the key a captured graph is kept under (graph_key); not the graphs
(model.py)."""

from __future__ import annotations

import torch

from kvrepl.backends.layers import GrowingLayer


def graph_key(layers: list[GrowingLayer]) -> tuple[int, ...]:
    """What a captured decode step reads and writes of a cache: every layer's K and V buffer
    address (a graph replays the addresses it was captured with). Layer 0's alone is not enough:
    a cache freed and another made can reuse its first buffer's address and not the others'."""
    return tuple(p for layer in layers for p in layer.addresses())


class FixedLayer(GrowingLayer):
    """A cache layer of the GPU path: a GrowingLayer whose `keys`/`values` views are made when
    read rather than at each length change. A decode step moves every layer's length, and
    making 2 views for each of 30 layers cost about 250 us of the host's time a token, more than
    the GPU left it at 135M (the host queues the next step while the GPU runs this one)."""

    _at: tuple[torch.Tensor, tuple[int, int]] | None = None  # (the K buffer, both addresses)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[..., : self._n, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        assert value is None, "a FixedLayer's keys are its buffer's filled part"

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[..., : self._n, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        assert value is None, "a FixedLayer's values are its buffer's filled part"

    def _set_length(self, n: int) -> None:
        self._n = n

    def addresses(self) -> tuple[int, int]:
        """Where the K and V buffers are (a fixed layer's never move, so read once)."""
        k = self._k
        if self._at is None or self._at[0] is not k:
            self._at = (k, (k.data_ptr(), self._v.data_ptr()))
        return self._at[1]

    def reset(self) -> None:
        super().reset()
        self._at = None
