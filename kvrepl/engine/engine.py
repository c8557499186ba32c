"""The engine: a prompt cache (cache.py) reused down to the first token that changed, chunked
prefill, and a streaming decode loop that samples (sampler.py) and verifies drafts (draft.py,
sized by policy.py).

It runs one model through a runner (runners.py): a transformers model or one on kvrepl's own
kernels, both of which fill the same kind of cache layers. It knows nothing about chat
templates, SQLite or the screen: it takes token ids and yields the `Plan` its prefill carries out
(plan.py), `Progress` (between the chunks of a long prefill), `TextDelta`, `Finish` and `Stats`.
Above the backends, only the engine's modules and the store's touch K/V tensors.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from kvrepl.config import Settings
from kvrepl.context import check_fits
from kvrepl.engine.cache import PromptCache
from kvrepl.engine.detokenize import IncrementalDecoder
from kvrepl.engine.draft import Drafter, Recase
from kvrepl.engine.plan import plan
from kvrepl.engine.policy import DraftPolicy
from kvrepl.engine.runners import runner_for
from kvrepl.engine.sampler import Sampler, TokenReader
from kvrepl.errors import PromptError
from kvrepl.events import Finish, Plan, Progress, Stats, TextDelta, TurnEvent

PREFILL_CHUNK = 512  # positions a prefill forward takes at most (placement sizes scratch by it)

# Drafted tokens fed ahead of the ids, each with its row's logits.
Drafts = deque[tuple[int, torch.Tensor]]


class Steer(Protocol):
    """What may force the tokens that follow one in place of sampled ones (conversation.py's think
    budget: the template's closing tag once the thinking has had its tokens). The engine knows
    no template: it asks after each token of the answer, forced ones included."""

    def after(self, token: int, text: str) -> list[int]:
        """`token` was taken (`text`: what it added to the answer); the ids to force next."""
        ...

    def room(self) -> int | None:
        """The most tokens that may follow before a steer could force some (None: no limit):
        what may be drafted."""
        ...


def _draft_room(steer: Steer | None, forcing: bool) -> int | None:
    """How many tokens may be drafted after this one: none while tokens are forced."""
    if forcing:
        return 0
    return steer.room() if steer is not None else None


_DEFAULTS = Settings()


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 is greedy. The defaults are the settings'
    (config.py declares them once)."""

    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    top_k: int = _DEFAULTS.top_k
    repetition_penalty: float = _DEFAULTS.repetition_penalty
    seed: int | None = _DEFAULTS.seed
    max_tokens: int = _DEFAULTS.max_tokens
    repeat_last_n: int = 64
    draft: bool = _DEFAULTS.draft

    @classmethod
    def from_settings(cls, s: Settings) -> Sampling:
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls) if hasattr(s, f.name)})

    @classmethod
    def greedy(cls, max_tokens: int) -> Sampling:
        """Plain greedy decoding: the likeliest token each step, no repetition penalty (the
        settings' default has one), as llama.cpp and `generate()` are compared in bench/."""
        return cls(temperature=0, repetition_penalty=1.0, max_tokens=max_tokens)


@dataclass
class TurnProgress:
    """What a turn has done so far; readable after an interrupt to report partial figures."""

    reused: int = 0
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    drafted: int = 0  # tokens fed as drafts, and of them the ones the answer took
    accepted: int = 0

    def stats(self) -> Stats:
        ttft = (self.t_first - self.t0) if self.t_first is not None else 0.0
        n = len(self.generated)
        span = (self.t_last or 0.0) - (self.t_first or 0.0)
        rate = (n - 1) / span if n > 1 and span > 0 else 0.0
        return Stats(self.reused, self.prefilled, n, round(ttft, 4), round(rate, 2),
                     self.drafted, self.accepted)  # fmt: skip


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
        chunk_size: int = PREFILL_CHUNK,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.context_length = context_length
        self.reuse = reuse
        self.chunk_size = chunk_size
        self.runner = runner_for(model)
        self.device = self.runner.device
        self.dtype = self.runner.kv_dtype  # the cache's dtype: what a snapshot must hold
        heads = getattr(model.config.get_text_config(), "num_key_value_heads", None)
        self.pc = PromptCache(self.runner.new_layers, heads)
        self.progress = TurnProgress()
        self.draft_policy = DraftPolicy()  # what drafting pays on this model, learnt across turns
        self.recase = Recase(tokenizer) if hasattr(tokenizer, "convert_tokens_to_ids") else None

    @property
    def cached_tokens(self) -> int:
        """How many positions the cache holds."""
        return len(self.pc.ids)

    @property
    def cached_ids(self) -> tuple[int, ...]:
        """The ids the cache holds, a copy."""
        return tuple(self.pc.ids)

    @property
    def can_cut(self) -> bool:
        """Whether the cache can be cut back (and so be saved and restored): False for chunked
        or linear-attention layers, which transformers cannot crop."""
        return self.pc.croppable

    def align(self, ids: Sequence[int]) -> Plan:
        """What a prefill of `ids` would do with the cache now (plan.py's rule)."""
        return plan(self.pc.ids, ids, reuse=self.reuse, croppable=self.pc.croppable)

    @torch.inference_mode()  # the buffers a turn left are inference tensors: copied into here
    def restore(self, snapshot: Any) -> list[str]:
        """Continue the cache from a snapshot's chunks (kvstore.LoadResult): the cache is cut to
        where they start, then they are copied in. Returns the snapshot's notes, and a line when
        its chunks do not fit the model (the cache then holds what it kept before them)."""
        notes = list(snapshot.notes)
        if not snapshot.chunks:
            return notes
        try:
            self.pc.keep_first(snapshot.start)
            if len(self.pc.ids) != snapshot.start:
                raise ValueError("the cache cannot be cut where the snapshot starts")
            parts = [snapshot.layer_parts(i) for i in range(len(self.pc.cache.layers))]
            devices = self.runner.layer_devices or self.device
            self.pc.extend(snapshot.ids, parts, dtype=self.dtype, device=devices)
        except ValueError as exc:
            notes.append(f"snapshot: dropped: {exc}; recomputing from the messages")
        return notes

    def export(self) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The cache's ids and each layer's (K, V) over them, for the snapshot store."""
        return list(self.pc.ids), self.pc.export()

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Bring the cache to `ids`, feeding only what differs; returns the last logits."""
        steps = self._prefill(ids)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _prefill(self, ids: Sequence[int]) -> Generator[Plan | Progress, None, torch.Tensor]:
        """`prefill`, yielding the Plan it carries out, before computing, then a Progress
        between chunks (none for a prompt of one chunk)."""
        if not ids:
            raise PromptError("nothing to prefill: the prompt is empty")
        check_fits("conversation", len(ids), self.context_length, room=1)  # a position to answer
        planned = self.align(ids)
        self.progress.reused = planned.keep
        yield planned
        self.pc.keep_first(planned.keep)
        rest = list(ids[len(self.pc.ids) :])
        self.progress.prefilled = 0  # counts what was computed, also when interrupted
        logits = None
        t0 = time.perf_counter()
        try:
            for start in range(0, len(rest), self.chunk_size):
                chunk = rest[start : start + self.chunk_size]
                logits = self._forward(chunk)
                self.pc.append(chunk)
                self.progress.prefilled += len(chunk)
                if self.progress.prefilled < len(rest):
                    yield Progress(self.progress.prefilled, len(rest), time.perf_counter() - t0)
        finally:
            self.pc.sync()
        assert logits is not None
        return logits

    def _forward(self, ids: list[int]) -> torch.Tensor:
        return self.runner.forward(ids, self.pc)

    @torch.inference_mode()
    def stream(self, ids: Sequence[int], sampling: Sampling, started: float | None = None,
               steer: Steer | None = None) -> Iterator[TurnEvent]:  # fmt: skip
        """Prefill `ids`, then decode token by token: TextDelta..., Finish, Stats. Closing the
        generator (or an exception inside it) leaves the cache consistent with its ids.
        `started` (a perf_counter time) is when the turn began, for its ttft: by default now.
        `steer` may force the tokens that follow one (the think budget's close)."""
        self.progress = progress = TurnProgress()
        if started is not None:
            progress.t0 = started
        vocab = self.model.config.get_text_config().vocab_size
        sampler = Sampler(sampling, vocab, self.runner.logits_device)
        logits = yield from self._prefill(ids)
        sampler.seen(ids)
        decoder = IncrementalDecoder(self.tokenizer)
        drafter = None
        if sampling.draft and self.runner.drafts:
            drafter = Drafter(self.pc.ids, self.draft_policy, self.end_ids, self.recase)
        try:
            reason = yield from self._decode(logits, sampler, sampling.max_tokens, decoder,
                                             drafter, steer)  # fmt: skip
            tail = decoder.flush()
            if tail:
                yield TextDelta(tail)
        finally:
            self.pc.sync()
        yield Finish(reason)
        yield progress.stats()

    def _decode(self, logits: torch.Tensor, sampler: Sampler, max_tokens: int,
                decoder: IncrementalDecoder, drafter: Drafter | None,
                steer: Steer | None) -> Generator[TextDelta, None, str]:  # fmt: skip
        """Sample a token, then feed it (its K/V joins the cache); the reason the answer ended.
        On a device that runs ahead of the host (a GPU: runner.ahead), token n + 1 is fed
        straight from the device before the host reads it, so the host's work on it overlaps
        the model's step; if it ends the answer, that step's position is cut again (pc.sync),
        as after an interrupt: the same cache and tokens as feeding after reading. The first
        token is read first (its step may capture a graph).
        With a drafter, a token is fed with the tokens drafted to follow it (`_feed`); each
        sampled token that is the next draft takes that draft's row of logits instead of a step
        of its own, and the first that is not cuts the drafts left (pc.sync): the sampler is
        asked exactly as token by token, so the answer is the same token for token. Sampled,
        this is speculative sampling with the draft as a point-mass guess: the draft t is taken
        with probability p(t) (the token drawn from its row is t), and otherwise the token is
        drawn from p without t, renormalised (the drawn token, given it is not t).
        The tokens a steer forces after a token take the place of sampled ones (fed one by one,
        nothing drafted past them), and are the answer's as any other."""
        progress = self.progress
        if max_tokens <= 0:
            return "length"
        reader = TokenReader(self.runner.logits_device)
        token_t = sampler.next_tensor(logits)
        reader.start(token_t)
        token, fed = reader.get(), False
        drafts: Drafts = deque()  # fed ahead of the ids, with their rows
        forced: deque[int] = deque()  # what the steer forces next, in place of sampling
        while True:
            if self._took(token):
                return "stop"
            text = decoder.add(token)
            if text:
                yield TextDelta(text)
            if steer is not None:
                forced.extend(steer.after(token, text))
            if len(self.pc.ids) + 1 >= self.context_length:
                return "length"
            if drafts and drafts[0][0] == token:
                logits = drafts.popleft()[1]  # accepted: its K/V is in the cache already
                progress.accepted += 1
            elif not fed:
                if drafts:  # the token is not the next draft: the drafts left leave the cache
                    self.pc.sync()
                room = _draft_room(steer, bool(forced))
                logits, drafts = self._feed(token, drafter, max_tokens, room)
            elif drafter is not None:  # fed ahead: the lookup still follows (drafter.copying)
                drafter.propose(self.pc.ids, token, 0)
            self.pc.append([token])
            sampler.seen([token])
            if len(progress.generated) >= max_tokens:
                return "length"
            if forced:
                token, fed = forced.popleft(), False
                continue
            token_t = sampler.next_tensor(logits)
            reader.start(token_t)
            fed = self._runs_ahead(drafter, drafts)
            if fed:  # a token the CPU sampled is an int (sampler.next_tensor)
                logits = self.runner.forward_token(torch.as_tensor(token_t), self.pc)
            token = reader.get()

    def _runs_ahead(self, drafter: Drafter | None, drafts: Drafts) -> bool:
        """Whether the next token is fed from the device before the host reads it: where the
        runner runs ahead and the context has room, unless drafts are in the cache past it or
        the answer is copying (then the token is read first, to be fed with its drafts)."""
        copying = drafts or (drafter is not None and drafter.copying)
        return self.runner.ahead and len(self.pc.ids) + 1 < self.context_length and not copying

    def _feed(self, token: int, drafter: Drafter | None, max_tokens: int,
              most: int | None = None) -> tuple[torch.Tensor, Drafts]:  # fmt: skip
        """Feed `token` with the drafts the drafter proposes (no more than token-by-token
        decoding would feed: the context's room, max_tokens, and `most`: a steer's); its
        logits, and each draft with the logits of its row."""
        if drafter is None:
            return self._forward([token]), deque()
        room = min(self.context_length - 2 - len(self.pc.ids),
                   max_tokens - len(self.progress.generated))  # fmt: skip
        if most is not None:
            room = min(room, most)
        guess = drafter.propose(self.pc.ids, token, room)
        self.runner.wait()  # a forward's time from here (a GPU queues work behind the host)
        t0 = time.perf_counter()
        if guess:
            rows = self.runner.model.forward([token, *guess], self.pc.cache.layers,
                                             all_logits=True)  # fmt: skip
        else:
            rows = self._forward([token])
        self.runner.wait()
        if not self.runner.model.warming:  # a graph's capture is no forward's cost
            drafter.policy.timed(1 + len(guess), time.perf_counter() - t0)
        if not guess:
            return rows, deque()
        self.progress.drafted += len(guess)
        return rows[0], deque(zip(guess, rows[1:], strict=True))

    def _took(self, token: int) -> bool:
        """Count a sampled token into the turn; True if it ends the answer (not kept)."""
        now = time.perf_counter()
        if self.progress.t_first is None:
            self.progress.t_first = now
        if token in self.end_ids:
            return True
        self.progress.t_last = now  # rate: generated tokens over the time they took
        self.progress.generated.append(token)
        return False
