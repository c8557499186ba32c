"""The engine's prompt cache: the token ids the model has seen and every layer's K/V for them.

Holds its K/V in the layers the backends fill (`GrowingLayer`, backends/layers.py) and is
the one place that knows transformers' cache layout (`cache.layers[i]`, `keys`/`values`;
`crop` takes a negative count in transformers 5). Only the engine (engine.py)
and the snapshot store (kvstore.py) use it.

Invariant, checked by `PromptCache.check()` in the tests after every operation: every layer holds
exactly `len(PromptCache.ids)` positions, and position i holds the K/V of `ids[i]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache

from kvrepl.backends.layers import GrowingLayer


def hf_layers(config: Any) -> list[Any]:
    """Cache layers for a transformers model. Full-attention and sliding-window layers are both
    growing layers that keep every position: transformers builds a sliding layer's mask from
    positions, so it attends within its window as before, and the layer can be cut at the first
    changed token, saved and restored like any other (the cost: its K/V for the whole context,
    not the window). Other kinds (chunked, linear attention) stay as transformers keeps them."""
    text_config = config.get_text_config(decoder=True)
    n_layers = text_config.num_hidden_layers
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
    layers: list[Any] = []
    for kind in layer_types[:n_layers]:
        if kind in ("full_attention", "sliding_attention"):
            layers.append(GrowingLayer())
        else:
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind]())
    return layers


def _new_cache(new_layers: Callable[[], list[Any]]) -> tuple[Cache, bool]:
    """A cache, and whether every layer can be cut back."""
    layers = new_layers()
    croppable = all(isinstance(layer, GrowingLayer) for layer in layers)
    return Cache(layers=layers), croppable


class PromptCache:
    """The token ids the model has seen and the transformers cache that holds their K/V."""

    def __init__(self, new_layers: Callable[[], list[Any]], kv_heads: int | None = None) -> None:
        self.new_layers = new_layers
        self.kv_heads = kv_heads
        self.cache, self.croppable = _new_cache(new_layers)
        self._ids: list[int] = []

    @property
    def ids(self) -> list[int]:
        """The ids whose K/V the layers hold, in order: the cache's own list, to read (the
        drafter searches it in place each step; a copy would cost a pass over the context)."""
        return self._ids

    def __len__(self) -> int:
        return len(self.ids)

    def layer_lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.cache.layers]

    def check(self) -> None:
        """Raise if any layer holds other than len(ids) positions (the invariant)."""
        lengths = set(self.layer_lengths())
        if lengths != {len(self.ids)} and not (not self.ids and lengths <= {0}):
            raise AssertionError(f"cache holds {sorted(lengths)} positions for {len(self.ids)} ids")

    def append(self, ids: Sequence[int]) -> None:
        """Count `ids` in: a forward pass has just written their K/V after the cached ones."""
        self._ids.extend(ids)

    def keep_first(self, n: int) -> None:
        """Keep the first n positions (0 too: the layers keep their buffers). A cache with
        layers that cannot be cut back is rebuilt from nothing instead (the caller says so)."""
        n = max(0, min(n, len(self.ids)))
        if n == len(self.ids):
            return  # nothing to cut (a cache that cannot be cut keeps its reuse then)
        if not self.croppable:
            self.reset()
            return
        self._cut_layers(n)
        del self._ids[n:]

    def sync(self) -> None:
        """After an interrupted forward pass some layers may hold more positions than ids: cut
        them back to the ids (a forward only ever adds)."""
        if set(self.layer_lengths()) - {len(self.ids)}:
            if self.croppable:
                self._cut_layers(len(self.ids))
            else:
                self.reset()

    def _cut_layers(self, n: int) -> None:
        """Cut every layer that holds more than n positions back to n (crop takes a negative
        count of positions to remove in transformers 5)."""
        for layer in self.cache.layers:
            if layer.get_seq_length() > n:
                layer.crop(n - layer.get_seq_length())

    def reset(self) -> None:
        self.cache, self.croppable = _new_cache(self.new_layers)
        self._ids = []

    def export(
        self, start: int = 0, end: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of positions [start, end), shape [1, heads, n, head_dim]."""
        end = len(self.ids) if end is None else end
        return [
            (layer.keys[..., start:end, :], layer.values[..., start:end, :])
            for layer in self.cache.layers
        ]

    def extend(
        self,
        ids: Sequence[int],
        layers: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        """Append ids and, per layer, their (keys, values) in parts that follow each other (a
        snapshot's chunks), copied once into the layers' buffers, on `device` (one, or one per
        layer for a model spread over devices). ValueError, with the cache as it was, when
        they do not fit this model."""
        if not ids:
            return
        if len(layers) != len(self.cache.layers):
            raise ValueError(
                f"snapshot has {len(layers)} layers, the model {len(self.cache.layers)}"
            )
        first = layers[0][0][0]
        for parts in layers:
            if sum(k.shape[-2] for k, _ in parts) != len(ids) or any(
                k.shape != v.shape for k, v in parts
            ):
                raise ValueError("snapshot tensors disagree with its token count")
            if dtype is not None and any(k.dtype != dtype or v.dtype != dtype for k, v in parts):
                raise ValueError(f"it holds {first.dtype} tensors, the model runs in {dtype}")
            if self.kv_heads and any(k.shape[1] != self.kv_heads for k, _ in parts):
                raise ValueError(
                    f"its tensors have {first.shape[1]} heads, the model {self.kv_heads}"
                )
        devices = device if isinstance(device, list) else [device] * len(layers)
        for layer, parts, dev in zip(self.cache.layers, layers, devices, strict=True):
            if self.croppable:
                layer.extend(parts, dev)
            else:
                for k, v in parts:
                    layer.update(k.to(dev or k.device), v.to(dev or v.device))
        self._ids.extend(ids)
