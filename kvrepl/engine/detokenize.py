"""Generated ids become text again: `IncrementalDecoder` gives the text deltas of a stream
of ids, holding back the bytes of an unfinished multi-byte character. The engine's
decode loop streams through it; chat templates are chat/prompt.py's.
"""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Turns ids into text deltas, holding back bytes of an unfinished multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end of a turn (an incomplete character as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]

    @property
    def text(self) -> str:
        return self._decode(self.ids)
