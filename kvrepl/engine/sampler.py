"""The sampler: the next token from a step's logits, by the turn's Sampling (engine.py), with
every operation on the logits' device and no wait for it until the token is read: on a GPU the
engine reads token n while the model already computes step n + 1 (engine._decode).

Owns: the penalty window of recent ids, the seeded generator, one vocabulary-sized work buffer
(no vocabulary-sized allocation per step), and TokenReader (a token's copy to the host, waited
for alone). On the CPU it samples from the few likeliest candidates (torch.topk) instead of
sorting the whole vocabulary; the distribution is the same (see `_from_candidates`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

# Candidates the CPU path looks at: top-p at a usual temperature keeps a few of them; a flat
# distribution, more. When the kept set reaches past the last (or top_k is larger), the full
# path decides instead.
CANDIDATES = (64, 1024)


class Sampler:
    """Temperature, top-k, top-p and a repetition penalty over the last `repeat_last_n` ids (as
    llama.cpp does: a small model loops without it), with an optional seed. Plain argmax when
    the temperature is 0."""

    def __init__(self, s: Any, vocab_size: int, device: torch.device) -> None:
        self.s = s
        self.vocab_size = vocab_size
        self.device = device
        self.recent: deque[int] = deque(maxlen=max(1, s.repeat_last_n))
        self._penalized: torch.Tensor | None = None  # the window's ids on the device, once
        self.gen = torch.Generator(device=device)
        if s.seed is not None:
            self.gen.manual_seed(s.seed)
        else:
            self.gen.seed()
        self._work: torch.Tensor | None = None

    def seen(self, ids: Sequence[int]) -> None:
        self.recent.extend(i for i in ids[-self.recent.maxlen :] if 0 <= i < self.vocab_size)
        self._penalized = None

    def next(self, logits: torch.Tensor) -> int:
        return int(self.next_tensor(logits))

    def next_tensor(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token as a 0-d tensor on the logits' device: queued, not waited for."""
        x = self._copy(logits)  # never write into the caller's logits
        self._penalize(x)
        if self.s.temperature <= 0:
            return torch.argmax(x)
        x.div_(self.s.temperature)
        if x.device.type == "cpu":  # its host-side decisions cost no wait there
            token = self._from_candidates(x)
            if token is not None:
                return token
        return self._full(x)

    def _copy(self, logits: torch.Tensor) -> torch.Tensor:
        if self._work is None or self._work.shape != logits.shape:
            self._work = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        return self._work.copy_(logits)

    def _penalize(self, x: torch.Tensor) -> None:
        """Divide the window's positive logits by the penalty, multiply its negative ones (an id
        seen twice is penalized once)."""
        p = self.s.repetition_penalty
        if p == 1.0 or not self.recent:
            return
        if self._penalized is None:
            self._penalized = _to_device(list(set(self.recent)), x.device)
        idx = self._penalized
        picked = x[idx]
        x[idx] = torch.where(picked > 0, picked / p, picked * p)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """Top-k and top-p over the whole vocabulary (scaled logits `x`, written into), then
        multinomial's own draw."""
        if self.s.top_k > 0:
            kth = torch.topk(x, min(self.s.top_k, x.numel())).values[-1]
            x.masked_fill_(x < kth, float("-inf"))
        if 0 < self.s.top_p < 1:
            sorted_logits, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(-1) - probs > self.s.top_p
            dropped = torch.zeros_like(drop).scatter(0, order, drop)  # back in vocabulary order
            x.masked_fill_(dropped, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        # multinomial's own draw for one sample (probs / Exp(1) noise, the largest), without
        # its checks of the probabilities, which wait for the GPU: the same token, seed for seed
        noise = torch.empty_like(probs).exponential_(1, generator=self.gen)
        return torch.argmax(probs / noise)

    def _from_candidates(self, x: torch.Tensor) -> torch.Tensor | None:
        """`_full`'s distribution from the likeliest candidates of the scaled logits `x` (64,
        then 1,024), or None where they cannot decide it. A draw differs from `_full`'s for the
        same seed: the same distribution, other random numbers."""
        top_k = self.s.top_k
        if top_k > 0:
            return self._draw(x, min(top_k, x.numel())) if top_k <= CANDIDATES[-1] else None
        for k in CANDIDATES:
            token = self._draw(x, min(k, x.numel()))
            if token is not None:
                return token
        return None

    def _draw(self, x: torch.Tensor, k: int) -> torch.Tensor | None:
        """A token from the k likeliest (`x`'s top-k set, or top-p's prefix of them, or all of
        them and the tail beyond, each by its probability), drawn by uniform numbers against
        cumulative weights; None where the top-p set reaches past them or a tie straddles the
        k-th. The tail's weight (the tokens beyond) is bounded before it is summed: at a usual
        temperature the bound decides, and the vocabulary is not read again."""
        n, top_p = x.numel(), self.s.top_p
        vals, idx = torch.topk(x, min(k + 1, n))  # one more: the tail's bound, and a tie
        if k < n and vals[k - 1] == vals[k]:
            return None
        weights = torch.exp(vals[:k] - vals[0])  # the candidates' probabilities, times Z / e^max
        cum = weights.cumsum(0)
        inside = float(cum[-1])
        tail = k < n and self.s.top_k == 0
        rest_max = (n - k) * float(torch.exp(vals[k] - vals[0])) if tail else 0.0
        rest = _Lazy(lambda: float(torch.exp(x - vals[0]).sum()) - inside)
        if 0 < top_p < 1:
            before = cum - weights  # the weight of the likelier candidates
            keep = int(torch.count_nonzero(before <= top_p * inside))
            if keep < int(torch.count_nonzero(before <= top_p * (inside + rest_max))):
                keep = int(torch.count_nonzero(before <= top_p * (inside + rest())))
            # the (k+1)-th token is kept too when the candidates weigh under top_p of it all
            if keep == k and tail and inside <= top_p * (inside + rest_max):
                if inside <= top_p * (inside + rest()):
                    return None
            tail = False
        else:
            keep = k
        if tail:
            u = float(torch.rand((), generator=self.gen))
            if u * (inside + rest_max) >= inside and u * (inside + rest()) >= inside:
                return self._tail(x, idx[:k], vals[0])
        target = torch.rand((), generator=self.gen) * cum[keep - 1]
        return idx[min(int(torch.searchsorted(cum[:keep], target, right=True)), keep - 1)]

    def _tail(self, x: torch.Tensor, candidates: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """A token from beyond the candidates, by its probability among those tokens."""
        weights = x.sub_(top).exp_()
        weights.index_fill_(0, candidates, 0.0)
        cum = weights.cumsum_(0)
        target = torch.rand((), generator=self.gen) * cum[-1]
        return torch.searchsorted(cum, target, right=True).clamp_(max=x.numel() - 1)


class _Lazy:
    """A value computed on the first call, then kept."""

    def __init__(self, compute: Any) -> None:
        self.compute, self.value = compute, None

    def __call__(self) -> Any:
        if self.value is None:
            self.value = self.compute()
        return self.value


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
