"""The OpenAI chat-completions request, read: a body checked field by field (messages, sampling
values checked as the settings check them, stop strings, streaming) into the conversation's
`Ask`, or BadRequest with the reason in one line. Never touches HTTP or the model.
"""

from __future__ import annotations

from typing import Any

from kvrepl.chat.serving import Ask
from kvrepl.config import OPTIONS, option_value
from kvrepl.store.records import clean_text

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The request's name of each sampling value, and the setting that checks it (bounds, type).
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
            "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens"}  # fmt: skip
MAX_STOPS = 16


class BadRequest(ValueError):
    """A request body that cannot be answered as it is; the message says why."""


def parse_request(data: Any) -> tuple[Ask, bool, bool]:
    """A chat request's body as an Ask, whether to stream, and whether to end a stream with a
    usage chunk (stream_options.include_usage). BadRequest with the reason."""
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    if data.get("n", 1) not in (1, None):
        raise BadRequest("n must be 1: kvrepl answers with one choice")
    values: dict[str, Any] = {}
    for key, name in SAMPLING.items():
        if data.get(key) is None:
            continue
        try:
            values[name] = option_value(OPTIONS[name], data[key])
        except ValueError as exc:
            raise BadRequest(f"{key} {exc}") from None
    stream = data.get("stream") or False
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("stream must be true or false, stream_options an object")
    usage_chunk = options.get("include_usage") is True
    ask = Ask(_messages(data.get("messages")), stop=_stops(data.get("stop")), **values)
    return ask, stream, usage_chunk


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with a role and a content")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be system, user or assistant, "
                             f"not {str(role)[:40]!r}")  # fmt: skip
        out.append({"role": ROLES[role], "content": clean_text(_content(m.get("content"), i))})
    return out


def _content(raw: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                     and isinstance(p.get("text"), str) for p in raw):  # fmt: skip
        return "\n".join(p["text"] for p in raw)
    raise BadRequest(f"messages[{i}].content must be text (a string or text parts)")


def _stops(raw: Any) -> tuple[str, ...]:
    stops = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"stop takes at most {MAX_STOPS} strings")
    return tuple(clean_text(s) for s in stops if s)
