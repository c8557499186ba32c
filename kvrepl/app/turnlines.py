"""What a turn reads as outside the answer itself: its stats line, the progress line of a long
prefill, and the JSON object `--json` prints for it. Pure functions of the turn's figures; the
renderer decides where and when they are printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvrepl.events import Progress, Stats

# A prefill shorter than this shows no progress line: it would only flicker.
PROGRESS_AFTER_S = 1.0


@dataclass(frozen=True)
class TurnResult:
    """What the renderer saw of one turn."""

    text: str
    think: str
    stats: Stats | None
    finish_reason: str | None
    interrupted: bool


def format_stats(
    stats: Stats | None, interrupted: bool = False, *, hit_max_tokens: bool = False
) -> str:
    """One line of turn figures, e.g. `reused 1,204 · prefilled 57 · generated 88 · ttft 0.21 s ·
    31.4 tok/s`, plus `drafted 60 (51 accepted)` when tokens were drafted, and `max tokens`
    and/or `interrupted` when they apply."""
    parts: list[str] = []
    if stats is not None:
        parts += [
            f"reused {stats.reused_tokens:,}",
            f"prefilled {stats.prefilled_tokens:,}",
            f"generated {stats.generated_tokens:,}",
        ]
        if stats.ttft_s > 0:  # none before the first token (a prefill interrupted)
            waited = stats.model_wait_s  # the ttft counts from Enter: a first turn's load too
            loading = f" ({waited:.1f} s of it loading the model)" if waited >= 0.05 else ""
            parts.append(f"ttft {stats.ttft_s:.2f} s{loading}")
        if stats.decode_tok_s > 0:  # none for fewer than two tokens
            parts.append(f"{stats.decode_tok_s:.1f} tok/s")
        if stats.drafted_tokens:
            parts.append(f"drafted {stats.drafted_tokens:,} ({stats.accepted_tokens:,} accepted)")
    if hit_max_tokens:
        parts.append("max tokens")
    if interrupted:
        parts.append("interrupted")
    return " · ".join(parts)


def format_progress(p: Progress) -> str:
    """`prefill 1,536 / 5,600 tokens · 240 tok/s · 17 s left`."""
    rate = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
    line = f"prefill {p.done:,} / {p.total:,} tokens"
    if rate > 0:
        line += f" · {rate:,.0f} tok/s · {(p.total - p.done) / rate:,.0f} s left"
    return line


def turn_object(result: TurnResult, about: dict[str, Any], *, think: bool) -> dict[str, Any]:
    """The `--json` object of one answer: `about` (the session's id and name), the answer, why it
    ended, and the five stats fields under `stats` as `export --format json` names them, with
    `drafted_tokens` and `accepted_tokens` after them when tokens were drafted; the thinking
    too when it is shown (`think`)."""
    reason = "interrupted" if result.interrupted else result.finish_reason
    obj: dict[str, Any] = {**about, "answer": result.text, "finish_reason": reason}
    if think and result.think:
        obj["think"] = result.think
    stats = result.stats
    obj["stats"] = stats.as_dict() | stats.draft_dict() if stats is not None else None
    return obj
