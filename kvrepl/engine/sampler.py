"""The sampler: the next token from a step's logits, by the turn's Sampling (engine.py).

On the CPU it works on the logits in place through numpy (torch's small ops cost tens of
microseconds each there, numpy's one or two): the repetition penalty is applied to the few ids
of its window and undone before it returns, greedy is one argmax, and a sampled token comes from
the candidates within a fixed distance of the top (`_from_candidates`), whose weight outside is
bounded, so the vocabulary is read twice at most. On a GPU every operation stays on the device,
with no wait for it until the token is read: the engine reads token n while the model already
computes step n + 1 (engine._decode).

Owns: the penalty window of recent ids, the seeded generators, one vocabulary-sized work buffer
for the GPU (no vocabulary-sized allocation per step), and TokenReader (a token's copy to the
host, waited for alone). Both paths draw from the same distribution (tests/test_sampler.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Candidates on the CPU: the tokens within SPAN (in logits over the temperature) of the likeliest,
# if at most CANDIDATES[0] (each of the others weighs under e^-SPAN of the likeliest: their
# weight is bounded, seldom summed); else the CANDIDATES[1] likeliest by torch.topk; else (top-p
# reaching past them, a tie at the last) the full sort.
SPAN = 20.0
CANDIDATES = (1024, 1024)


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
        self._window: np.ndarray | None = None  # the same on the host
        self.gen = torch.Generator(device=device)
        if s.seed is not None:
            self.gen.manual_seed(s.seed)
        else:
            self.gen.seed()
        self.rng = np.random.default_rng(s.seed)  # the CPU path's uniform numbers
        self._work: torch.Tensor | None = None

    def seen(self, ids: Sequence[int]) -> None:
        self.recent.extend(i for i in ids[-self.recent.maxlen :] if 0 <= i < self.vocab_size)
        self._penalized = self._window = None

    def next_tensor(self, logits: torch.Tensor) -> torch.Tensor | int:
        """The next token: on a GPU a 0-d tensor on the device, queued, not waited for; on the
        CPU decided here, an int (a tensor made of it cost ~20 us a token, its code cold after
        each forward; TokenReader and int() take either)."""
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
            return self._on_host(logits)
        x = self._copy(logits)  # never write into the caller's logits
        self._penalize(x)
        if self.s.temperature <= 0:
            return torch.argmax(x)
        return self._full(x.div_(self.s.temperature))

    def _on_host(self, logits: torch.Tensor) -> int:
        """The token, from the logits in place (contiguous, or a copy): the penalty is written
        into them and the values it replaced written back before returning, whatever happens."""
        x = logits.numpy() if logits.is_contiguous() else logits.contiguous().numpy()
        ids, saved = self._penalize_host(x)
        try:
            if self.s.temperature <= 0:
                return int(x.argmax())
            token = self._from_candidates(x)
            if token is None:
                full = torch.from_numpy(x).div(self.s.temperature)  # a copy: _full writes in it
                token = int(self._full(full))
            return token
        finally:
            if ids is not None:
                x[ids] = saved

    def _penalize_host(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`_penalize` on the host, in place; the ids and the values they had."""
        p = self.s.repetition_penalty
        if p == 1.0 or not self.recent:
            return None, None
        if self._window is None:
            self._window = np.fromiter(set(self.recent), dtype=np.int64)
        ids = self._window
        saved = x[ids]
        p32 = np.float32(p)  # as torch divides a float32 tensor by a Python float
        x[ids] = np.where(saved > 0, saved / p32, saved * p32)
        return ids, saved

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

    def _from_candidates(self, x: np.ndarray) -> int | None:
        """`_full`'s distribution from the penalized logits `x` (unscaled, not written), or
        None where the candidates cannot decide it."""
        top = float(x.max())
        token = self._near(x, top)
        return token if token is not None else self._likeliest(x, top)

    def _near(self, x: np.ndarray, top: float) -> int | None:
        """From the tokens within SPAN of the top, if they are few enough (and hold the top-k
        set, if any)."""
        t, top_k = self.s.temperature, self.s.top_k
        near = np.flatnonzero(x >= top - SPAN * t)
        if len(near) > CANDIDATES[0] or len(near) < top_k:
            return None
        ids = near[np.argsort(-x[near], kind="stable")]  # likeliest first; a tie by id
        vals = (x[ids].astype(np.float64) - top) / t
        if top_k > 0:  # the top-k set: those at or above the k-th (ties kept)
            ids = ids[vals >= vals[top_k - 1]]
            return self._choose(x, ids, vals[: len(ids)], 0.0)
        return self._choose(x, ids, vals, (x.size - len(ids)) * np.exp(-SPAN))

    def _likeliest(self, x: np.ndarray, top: float) -> int | None:
        """From torch.topk's top_k (or CANDIDATES[1]) likeliest; None on a tie at the last."""
        n, top_k = x.size, self.s.top_k
        k = top_k or CANDIDATES[1]
        if k > CANDIDATES[1] or k >= n:
            return None
        v, i = torch.topk(torch.from_numpy(x), k + 1)  # one more: the outside's bound, a tie
        if v[k - 1] == v[k]:
            return None
        vals = (v.numpy().astype(np.float64) - top) / self.s.temperature
        bound = 0.0 if top_k else (n - k) * float(np.exp(vals[k]))
        return self._choose(x, i.numpy()[:k], vals[:k], bound)

    def _choose(self, x: np.ndarray, ids: np.ndarray, vals: np.ndarray,
                outside_max: float) -> int | None:  # fmt: skip
        """A token of the candidates `ids` (scaled logits `vals` less the top's, descending;
        the others of the distribution weighing at most `outside_max` together, in units of
        the top's weight): top-p's prefix of them, or all of them and the outside, each by its
        probability; None where the top-p set reaches past them. The outside's weight is
        summed only where its bound does not decide."""
        weights = np.exp(vals)
        cum = np.cumsum(weights)
        inside, top_p, k = float(cum[-1]), self.s.top_p, len(ids)
        outside = _Lazy(lambda: self._outside(x, inside))
        if 0 < top_p < 1:
            before = cum - weights  # the weight of the likelier candidates
            keep = int(np.count_nonzero(before <= top_p * inside))
            if keep < int(np.count_nonzero(before <= top_p * (inside + outside_max))):
                keep = int(np.count_nonzero(before <= top_p * (inside + outside())))
            # the likeliest outside is kept too when the candidates weigh under top_p of it all
            if keep == k and outside_max > 0 and inside <= top_p * (inside + outside_max):
                if inside <= top_p * (inside + outside()):
                    return None
            outside_max = 0.0
        else:
            keep = k
        u = self.rng.random()
        if outside_max > 0 and u * (inside + outside_max) >= inside:
            if u * (inside + outside()) >= inside:
                return self._tail(x, ids)
        target = self.rng.random() * cum[keep - 1]
        return int(ids[min(int(np.searchsorted(cum[:keep], target, side="right")), keep - 1)])

    def _weights(self, x: np.ndarray) -> np.ndarray:
        """Every token's weight, in units of the top's."""
        return np.exp((x.astype(np.float64) - x.max()) / self.s.temperature)

    def _outside(self, x: np.ndarray, inside: float) -> float:
        """The weight of the tokens outside the candidates (`inside` theirs), in the top's units."""
        return max(0.0, float(self._weights(x).sum()) - inside)

    def _tail(self, x: np.ndarray, candidates: np.ndarray) -> int:
        """A token from beyond the candidates, by its probability among those tokens."""
        weights = self._weights(x)
        weights[candidates] = 0.0
        cum = np.cumsum(weights)
        target = self.rng.random() * cum[-1]
        return min(int(np.searchsorted(cum, target, side="right")), x.size - 1)


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
        self.pending: torch.Tensor | int | None = None

    def start(self, token: torch.Tensor | int) -> None:
        if self.cuda:
            self.host.copy_(token.view(1), non_blocking=True)  # type: ignore[union-attr]
            self.event.record()
        else:
            self.pending = token

    def get(self) -> int:
        if self.cuda:
            self.event.synchronize()
            return int(self.host[0])
        assert self.pending is not None
        return int(self.pending)
