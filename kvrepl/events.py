"""What one turn yields, as small frozen dataclasses. The engine and the turn logic produce them;
the renderer and the store consume them. Nothing here prints or computes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TextDelta:
    """A piece of answer text (never a split multi-byte character)."""

    text: str


@dataclass(frozen=True)
class ThinkDelta:
    """A piece of the model's thinking (the text between <think> and </think>)."""

    text: str


@dataclass(frozen=True)
class Notice:
    """One informative line for the user: a cache cut, a snapshot dropped, a model loaded."""

    text: str


@dataclass(frozen=True)
class Progress:
    """A long prefill between two chunks: `done` of `total` tokens computed, `elapsed_s` since it
    began (so the renderer needs no clock of its own for rates and the time left)."""

    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True)
class Plan:
    """What a prefill does with the cache, said before it computes: keep `keep` positions (of the
    `cached` it holds), recompute `recompute`; `why`: "empty", "extend" (the cache is a prefix),
    "cut" (it is cut back), "cannot cut" (rebuilt: its layers cannot be cut), or "no reuse"
    (--no-reuse)."""

    keep: int
    recompute: int
    cached: int
    why: str


@dataclass(frozen=True)
class Finish:
    """Why generation ended: "stop" (an end token) or "length" (max tokens or the
    context); an interrupted turn yields none (its Turn's result says interrupted)."""

    reason: str


@dataclass(frozen=True)
class Stats:
    """The figures of one turn. The first five are stored and exported (`as_dict`); the drafting
    figures (tokens fed as drafts, and of them the ones the answer took) are shown with the
    turn only, when drafting happened, as is the part of the ttft spent waiting for the model
    (the ttft counts from Enter)."""

    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tok_s: float
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    model_wait_s: float = 0.0  # of the ttft, the wait for the model to load (the first turn)

    def as_dict(self) -> dict[str, float]:
        """The five stored figures, by the names the store and `export` use."""
        return {k: v for k, v in asdict(self).items() if k not in SHOWN_ONLY}

    def draft_dict(self) -> dict[str, int]:
        """The drafting figures, when drafting happened; else empty."""
        if not self.drafted_tokens:
            return {}
        return {"drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens}


DRAFT_FIELDS = ("drafted_tokens", "accepted_tokens")
SHOWN_ONLY = (*DRAFT_FIELDS, "model_wait_s")  # with the turn, never stored


TurnEvent = TextDelta | ThinkDelta | Notice | Plan | Progress | Finish | Stats
