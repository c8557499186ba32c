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
class Finish:
    """Why generation ended: "stop" (an end token) or "length" (max tokens or the
    context); an interrupted turn yields none (its Turn's result says interrupted)."""

    reason: str


@dataclass(frozen=True)
class Stats:
    """The figures of one turn. Exactly these five fields; they are stored and exported as such."""

    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tok_s: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


TurnEvent = TextDelta | ThinkDelta | Notice | Progress | Finish | Stats
