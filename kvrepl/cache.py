"""The engine's prompt cache: the token ids the model has seen and every layer's K/V for them.

Owns how K/V are held (`GrowingLayer`: room reserved ahead, written by index, cut back by a
length change) and the one place that knows transformers' cache layout (`cache.layers[i]`,
`keys`/`values`; `crop` takes a negative count in transformers 5). Only the engine (engine.py)
and the snapshot store (kvstore.py) use it.

Invariant, checked by `PromptCache.check()` in the tests after every operation: every layer holds
exactly `len(PromptCache.ids)` positions, and position i holds the K/V of `ids[i]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer

_GROW_STEP = 256  # positions reserved ahead; growth rounds up to this


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that grows in place: room is reserved ahead and new K/V are
    written by index, so a decode step does not copy the whole cache (DynamicLayer's torch.cat
    does, and at 6k tokens that copy was 70% of each step). `keys`/`values` are views of the
    filled part, so the rest of transformers reads them as usual."""

    def __init__(self, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        self.limit = limit  # fixed capacity: the buffers are made at this size and never move

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True
        self._k = key_states.new_empty(_shape(key_states, 0))
        self._v = value_states.new_empty(_shape(value_states, 0))

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
        self._k, self._v = k, v

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
        if self._k is not None:
            self.keys = self._k[..., :n, :]
            self.values = self._v[..., :n, :]

    def get_seq_length(self) -> int:
        return self._n

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self._set_length(max(0, self._n + tokens_to_remove))

    def reset(self) -> None:
        self._k = self._v = self.keys = self.values = None
        self._n = 0
        self.is_initialized = False


def _shape(t: torch.Tensor, length: int) -> tuple[int, ...]:
    return (*t.shape[:-2], length, t.shape[-1])


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
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def layer_lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.cache.layers]

    def check(self) -> None:
        """Raise if any layer holds other than len(ids) positions (the invariant)."""
        lengths = set(self.layer_lengths())
        if lengths != {len(self.ids)} and not (not self.ids and lengths <= {0}):
            raise AssertionError(f"cache holds {sorted(lengths)} positions for {len(self.ids)} ids")

    def truncate(self, n: int) -> None:
        """Keep the first n positions (0 too: the layers keep their buffers). A cache with
        layers that cannot be cut back is rebuilt from nothing instead (the caller says so)."""
        n = max(0, min(n, len(self.ids)))
        if n == len(self.ids):
            return  # nothing to cut (a cache that cannot be cut keeps its reuse then)
        if not self.croppable:
            self.reset()
            return
        self._cut_layers(n)
        del self.ids[n:]

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
        self.ids = []

    def export(
        self, start: int = 0, end: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of positions [start, end), shape [1, heads, n, head_dim]."""
        end = len(self.ids) if end is None else end
        return [
            (layer.keys[..., start:end, :], layer.values[..., start:end, :])
            for layer in self.cache.layers
        ]

    def restore(
        self,
        ids: Sequence[int],
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        """Fill an empty cache from per-layer (keys, values) of all the ids."""
        self.reset()
        self.extend(ids, [[kv] for kv in layers], dtype, device)

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
        self.ids.extend(ids)
