"""The engine: a prompt cache that is reused down to the first token that changed, chunked
prefill, a small sampler and a streaming decode loop that yields events.

It knows how a transformers cache is laid out (`cache.layers[i]`; `crop` takes a negative count
in transformers 5) and nothing about chat templates, SQLite or the screen: it takes token ids
and yields `TextDelta`, `Finish` and `Stats`. Only this module and `kvstore.py` touch K/V tensors.

Invariant, checked by `PromptCache.check()` in the tests after every operation: every layer holds
exactly `len(PromptCache.ids)` positions, and position i holds the K/V of `ids[i]`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer

from kvrepl.errors import PromptError
from kvrepl.events import Finish, Stats, TextDelta, TurnEvent
from kvrepl.prompt import IncrementalDecoder

_GROW_STEP = 256  # positions reserved ahead; growth rounds up to this


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that grows in place: room is reserved ahead and new K/V are
    written by index, so a decode step does not copy the whole cache (DynamicLayer's torch.cat
    does, and at 6k tokens that copy was 70% of each step). `keys`/`values` are views of the
    filled part, so the rest of transformers reads them as usual."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

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
        new_cap = -(-max(need, cap + cap // 2) // _GROW_STEP) * _GROW_STEP
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


def _new_cache(config: Any) -> tuple[Cache, bool]:
    """A cache for this model, and whether every layer can be cut back (full attention only)."""
    text_config = config.get_text_config(decoder=True)
    n_layers = text_config.num_hidden_layers
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
    layers: list[Any] = []
    for kind in layer_types[:n_layers]:
        if kind == "full_attention":
            layers.append(GrowingLayer())
        elif kind == "sliding_attention":
            window = getattr(text_config, "sliding_window", None)
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](sliding_window=window))
        else:
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind]())
    croppable = all(isinstance(layer, GrowingLayer) for layer in layers)
    return Cache(layers=layers), croppable


class PromptCache:
    """The token ids the model has seen and the transformers cache that holds their K/V."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.cache, self.croppable = _new_cache(config)
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
        """Keep the first n positions. A cache with sliding-window layers cannot be cut back and
        is rebuilt from nothing instead (the caller says so)."""
        n = max(0, min(n, len(self.ids)))
        if n == len(self.ids):
            return  # nothing to cut (a sliding-window cache keeps its reuse then)
        if n == 0 or not self.croppable:
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
        self.cache, self.croppable = _new_cache(self.config)
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
    ) -> None:
        """Fill an empty cache from a snapshot: ids and their per-layer K/V (ValueError, and an
        empty cache, when they do not fit this model)."""
        self.reset()
        if not ids:
            return
        if len(layers) != len(self.cache.layers):
            raise ValueError(
                f"snapshot has {len(layers)} layers, the model {len(self.cache.layers)}"
            )
        if any(k.shape[-2] != len(ids) or v.shape[-2] != len(ids) for k, v in layers):
            raise ValueError("snapshot tensors disagree with its token count")
        if dtype is not None and any(k.dtype != dtype or v.dtype != dtype for k, v in layers):
            raise ValueError(f"it holds {layers[0][0].dtype} tensors, the model runs in {dtype}")
        heads = getattr(self.config.get_text_config(), "num_key_value_heads", None)
        if heads and any(k.shape[1] != heads for k, _ in layers):
            raise ValueError(f"its tensors have {layers[0][0].shape[1]} heads, the model {heads}")
        for layer, (k, v) in zip(self.cache.layers, layers, strict=True):
            layer.update(k, v)
        self.ids = list(ids)


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 is greedy."""

    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 1024
    repeat_last_n: int = 64


@dataclass
class TurnProgress:
    """What a turn has done so far; readable after an interrupt to report partial figures."""

    reused: int = 0
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None

    def stats(self) -> Stats:
        ttft = (self.t_first - self.t0) if self.t_first is not None else 0.0
        n = len(self.generated)
        span = (self.t_last or 0.0) - (self.t_first or 0.0)
        rate = (n - 1) / span if n > 1 and span > 0 else 0.0
        return Stats(self.reused, self.prefilled, n, round(ttft, 4), round(rate, 2))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Runs one model over one PromptCache. `reuse=False` recomputes the whole prompt each turn
    (the baseline that benchmarks and equivalence tests compare against)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        end_ids: set[int],
        context_length: int,
        reuse: bool = True,
        chunk_size: int = 512,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.context_length = context_length
        self.reuse = reuse
        self.chunk_size = chunk_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pc = PromptCache(model.config)
        self.progress = TurnProgress()

    def plan(self, ids: Sequence[int]) -> int:
        """How many leading positions of the cache a prefill of `ids` would keep: the common
        prefix, less one so that at least one token is fed (its logits start the answer)."""
        if not self.reuse or not ids:
            return 0
        keep = min(common_prefix(self.pc.ids, ids), len(ids) - 1)
        return keep if (self.pc.croppable or keep == len(self.pc.ids)) else 0

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Bring the cache to `ids`, feeding only what differs; returns the last logits."""
        if not ids:
            raise PromptError("nothing to prefill: the prompt is empty")
        if len(ids) >= self.context_length:
            raise PromptError(
                f"the conversation is {len(ids):,} tokens; the model's context is "
                f"{self.context_length:,}: use /new, /undo or /edit to shorten it"
            )
        keep = self.plan(ids)
        self.pc.truncate(keep)
        self.progress.reused = len(self.pc.ids)
        rest = list(ids[len(self.pc.ids) :])
        self.progress.prefilled = 0  # counts what was computed, also when interrupted
        logits = None
        try:
            for start in range(0, len(rest), self.chunk_size):
                chunk = rest[start : start + self.chunk_size]
                logits = self._forward(chunk)
                self.pc.ids.extend(chunk)
                self.progress.prefilled += len(chunk)
        finally:
            self.pc.sync()
        assert logits is not None
        return logits

    def _forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, cache=self.pc.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    @torch.inference_mode()
    def stream(self, ids: Sequence[int], sampling: Sampling) -> Iterator[TurnEvent]:
        """Prefill `ids`, then decode token by token: TextDelta..., Finish, Stats. Closing the
        generator (or an exception inside it) leaves the cache consistent with its ids."""
        self.progress = progress = TurnProgress()
        sampler = Sampler(sampling, self.model.config.get_text_config().vocab_size, self.device)
        logits = self.prefill(ids)
        sampler.seen(ids)
        decoder = IncrementalDecoder(self.tokenizer)
        reason = "length"
        try:
            while len(progress.generated) < sampling.max_tokens:
                token = sampler.next(logits)
                now = time.perf_counter()
                if progress.t_first is None:
                    progress.t_first = now
                if token in self.end_ids:
                    reason = "stop"
                    break
                progress.t_last = now  # rate: generated tokens over the time they took
                progress.generated.append(token)
                text = decoder.add(token)
                if text:
                    yield TextDelta(text)
                if len(self.pc.ids) + 1 >= self.context_length:
                    break
                logits = self._forward([token])
                self.pc.ids.append(token)
                sampler.seen([token])
            tail = decoder.flush()
            if tail:
                yield TextDelta(tail)
        finally:
            self.pc.sync()
        yield Finish(reason)
        yield progress.stats()


class Sampler:
    """Temperature, top-k, top-p and a repetition penalty over the last `repeat_last_n` ids (as
    llama.cpp does: a small model loops without it), with an optional seed. Plain argmax when
    the temperature is 0."""

    def __init__(self, s: Sampling, vocab_size: int, device: torch.device) -> None:
        self.s = s
        self.vocab_size = vocab_size
        self.device = device
        self.recent: deque[int] = deque(maxlen=max(1, s.repeat_last_n))
        self.gen = torch.Generator(device=device)
        if s.seed is not None:
            self.gen.manual_seed(s.seed)
        else:
            self.gen.seed()

    def seen(self, ids: Sequence[int]) -> None:
        self.recent.extend(i for i in ids[-self.recent.maxlen :] if 0 <= i < self.vocab_size)

    def next(self, logits: torch.Tensor) -> int:
        logits = logits.float().clone()  # never write into the caller's logits
        if self.s.repetition_penalty != 1.0 and self.recent:
            idx = torch.tensor(sorted(set(self.recent)), device=logits.device)
            picked = logits[idx]
            p = self.s.repetition_penalty
            logits[idx] = torch.where(picked > 0, picked / p, picked * p)
        if self.s.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / self.s.temperature
        if self.s.top_k > 0:
            kth = torch.topk(logits, min(self.s.top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        if 0 < self.s.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(-1) - probs > self.s.top_p
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))
