"""The sampler: the next token from a step's logits, by the turn's Sampling (engine.py), with
every operation on the logits' device and no wait for it until the token is read: on a GPU the
engine reads token n while the model already computes step n + 1 (engine._decode).

Owns: the penalty window of recent ids, the seeded generator, and TokenReader (a token's copy
to the host, waited for alone).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch


class Sampler:
    """Temperature, top-k, top-p and a repetition penalty over the last `repeat_last_n` ids (as
    llama.cpp does: a small model loops without it), with an optional seed. Plain argmax when
    the temperature is 0."""

    def __init__(self, s: Any, vocab_size: int, device: torch.device) -> None:
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
        return int(self.next_tensor(logits))

    def next_tensor(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token as a 0-d tensor on the logits' device: queued, not waited for."""
        logits = logits.float().clone()  # never write into the caller's logits
        if self.s.repetition_penalty != 1.0 and self.recent:
            idx = _to_device(sorted(set(self.recent)), logits.device)
            picked = logits[idx]
            p = self.s.repetition_penalty
            logits[idx] = torch.where(picked > 0, picked / p, picked * p)
        if self.s.temperature <= 0:
            return torch.argmax(logits)
        logits = logits / self.s.temperature
        if self.s.top_k > 0:
            kth = torch.topk(logits, min(self.s.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if 0 < self.s.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(-1) - probs > self.s.top_p
            dropped = torch.zeros_like(drop).scatter(0, order, drop)  # back in vocabulary order
            logits = logits.masked_fill(dropped, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        # multinomial's own draw for one sample (probs / Exp(1) noise, the largest), without
        # its checks of the probabilities, which wait for the GPU: the same token, seed for seed
        noise = torch.empty_like(probs).exponential_(1, generator=self.gen)
        return torch.argmax(probs / noise)


def _to_device(ids: list[int], device: torch.device) -> torch.Tensor:
    """ids as a tensor on `device`; to a GPU through pinned memory, so that the copy queues
    behind the running step instead of waiting for it."""
    if device.type != "cuda":
        return torch.tensor(ids, device=device)
    return torch.tensor(ids, pin_memory=True).to(device, non_blocking=True)


class TokenReader:
    """A token tensor's value on the host: `start` queues its copy, `get` waits for that copy
    alone (on a GPU: a pinned buffer and an event, not a sync of everything queued after)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.pending: torch.Tensor | None = None

    def start(self, token: torch.Tensor) -> None:
        if self.cuda:
            self.host.copy_(token.view(1), non_blocking=True)
            self.event.record()
        else:
            self.pending = token

    def get(self) -> int:
        if self.cuda:
            self.event.synchronize()
            return int(self.host[0])
        assert self.pending is not None
        return int(self.pending)
