"""Exporting a conversation (its active branch) as Markdown or JSON. Pure functions over what the
conversation returns (its transcript), the session's figures (listing.py's `SessionRow`, counted
as every listing counts them) and the system prompt in force; the JSON holds each turn's stats
under the engine's five field names."""

from __future__ import annotations

import json
from typing import Any

from kvrepl.app.listing import SessionRow
from kvrepl.store.records import Message, Session

FORMATS = ("md", "json")
FIGURES = ("turns", "tokens", "cached_tokens", "bytes_on_disk")  # SessionRow.as_dict's


Transcript = tuple[list[Message], dict[int, dict[str, Any]]]  # messages, figures by message id


def export(session: Session, transcript: Transcript, fmt: str, *, row: SessionRow | None = None,
           system: str | None = None) -> str:  # fmt: skip
    """The session's active branch (`transcript`: its messages and each answer's figures, from
    `Conversation.transcript`) as `fmt`; `row`: its figures; `system`: the system prompt in force
    (by default the one set in the session, `/set system`), which the conversation is rendered
    under whenever it was set."""
    if fmt not in FORMATS:
        raise ValueError(fmt)
    messages, stats = transcript
    system = session.settings.get("system", "") if system is None else system
    if fmt == "json":
        return to_json(session, messages, stats, row=row, system=system)
    return to_markdown(session, messages, stats, row=row, system=system)


def to_json(session: Session, messages: list[Message], stats: dict[int, dict[str, Any]], *,
            row: SessionRow | None = None, system: str = "") -> str:  # fmt: skip
    figures = row.as_dict() if row is not None else {}
    doc = {
        "session": {
            "id": session.id,
            "name": session.name,
            "title": session.title,
            "model": session.model,
            "created": session.created,
            "updated": session.updated,
            "settings": session.settings,
            "system": system,
            **{name: figures[name] for name in FIGURES if name in figures},
        },
        "messages": [
            {
                "id": m.id,
                "parent_id": m.parent_id,
                "role": m.role,
                "content": m.content,
                "think": m.think,
                "created": m.created,
                "interrupted": m.interrupted,
                **({"stats": stats[m.id]} if m.id in stats else {}),
            }
            for m in messages
        ],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def to_markdown(session: Session, messages: list[Message], stats: dict[int, dict[str, Any]], *,
                row: SessionRow | None = None, system: str = "") -> str:  # fmt: skip
    title = session.name or session.title or session.id
    lines = [f"# {title}", "", f"model: {session.model} · created {session.created}", ""]
    if row is not None:
        lines += [" · ".join(f"{label}: {value}" for label, value in row.figures()), ""]
    if system:
        lines += ["## system", "", system, ""]
    turn = 0
    for m in messages:
        if m.role == "user":
            turn += 1
            lines += [f"## {turn}. user", "", m.content, ""]
        elif m.role == "assistant":
            lines += ["### assistant" + (" (interrupted)" if m.interrupted else ""), ""]
            if m.think:
                lines += ["<details><summary>thinking</summary>", "", m.think, "", "</details>", ""]
            lines += [m.content, ""]
            if s := stats.get(m.id):
                lines += [f"*{_figures_line(s)}*", ""]
        else:
            lines += [f"## {m.role}", "", m.content, ""]
    return "\n".join(lines)


def _figures_line(s: dict[str, Any]) -> str:
    """A turn's figures; an answer stopped before its first token has no ttft, and one of fewer
    than two tokens no decode speed (their zeros would read as measurements)."""
    parts = [f"reused {s['reused_tokens']}", f"prefilled {s['prefilled_tokens']}",
             f"generated {s['generated_tokens']}"]  # fmt: skip
    if s["ttft_s"]:
        parts.append(f"ttft {s['ttft_s']} s")
    if s["decode_tok_s"]:
        parts.append(f"{s['decode_tok_s']} tok/s")
    return " · ".join(parts)
