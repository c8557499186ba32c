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
        self._backend = _backend(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
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


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers` object that transformers' decode would end in, where it does nothing
    else (its own decode and _decode, no clean-up of spaces): called straight, a token's two
    decodes took ~25 us less, the wrapper's Python cold after each forward. Else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    kind = type(tokenizer)
    plain = (
        isinstance(tokenizer, TokenizersBackend)
        and kind.decode is PreTrainedTokenizerBase.decode
        and kind._decode is TokenizersBackend._decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    return getattr(tokenizer, "_tokenizer", None) if plain else None
