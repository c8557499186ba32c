"""Prompts: messages become token ids through the model's chat template, and generated ids become
text again. Owns three things:

- `Prompt.render`: the chat template renders the control structure; message text is tokenized
  on its own with special tokens split, so text a user types that spells `<|im_end|>` stays
  plain text and can never become a control token.
- `IncrementalDecoder`: text deltas from ids that never split a multi-byte character.
- `ThinkSplitter`: `<think>...</think>` separated from the answer, also while streaming.

It never touches a KV cache and never samples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from kvrepl.errors import PromptError
from kvrepl.events import TextDelta, ThinkDelta

# Private-use code points stand in for message text while the template renders.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
# End-of-turn tokens worth stopping on when a tokenizer has them, beside the ones it names.
_END_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)


class Prompt:
    """Renders conversations for one tokenizer. `messages` are dicts with `role` and `content`."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise PromptError(
                "this model has no chat template: pass one with --chat-template FILE "
                "(a Jinja file such as the model card's template)"
            )

    @property
    def supports_thinking(self) -> bool:
        """Whether the template has a thinking switch (`enable_thinking`)."""
        return "enable_thinking" in self.template

    def render_text(
        self,
        messages: Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> str:
        """The template's text output for these messages (for display and checks)."""
        kwargs: dict[str, Any] = {}
        if enable_thinking is not None and self.supports_thinking:
            kwargs["enable_thinking"] = enable_thinking
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except Exception as exc:  # jinja errors: bad template or roles it refuses
            raise PromptError(f"the chat template failed: {exc}") from exc

    def render(
        self,
        messages: Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Token ids for these messages. Template text may hold control tokens; message text never."""
        stand_ins = [
            {"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)
        ]
        text = self.render_text(
            stand_ins, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        pieces = _SENTINEL_RE.split(text)
        indices = [int(x) for x in pieces[1::2]]
        if indices != sorted(set(indices)) or any(i >= len(messages) for i in indices):
            raise PromptError("the chat template reorders or repeats messages; kvrepl cannot use it")
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2 == 0:
                ids += self._encode(piece, specials=True)
            else:
                ids += self._encode(messages[int(piece)]["content"], specials=False)
        return ids

    def _encode(self, text: str, *, specials: bool) -> list[int]:
        if not text:
            return []
        return self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=not specials
        ).input_ids

    def count_tokens(self, text: str) -> int:
        """How many tokens a message text takes (before template overhead)."""
        return len(self._encode(text, specials=False))

    def control_token_ids(self) -> set[int]:
        """Ids of the tokenizer's special (control) tokens."""
        return set(self.tokenizer.all_special_ids) | {
            i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special
        }

    def end_token_ids(self, generation_config: Any = None) -> set[int]:
        """Every token that ends a turn: the tokenizer's eos, the generation config's eos (an int
        or a list), and the usual end-of-turn tokens when this vocabulary has them."""
        ends: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ends.add(int(self.tokenizer.eos_token_id))
        eos = getattr(generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ends.add(eos)
        elif isinstance(eos, Iterable):
            ends.update(int(e) for e in eos)
        vocab = self.tokenizer.get_vocab()
        ends.update(vocab[t] for t in _END_TOKENS if t in vocab)
        return ends

    def opens_in_think(self, ids: Sequence[int]) -> bool:
        """Whether the rendered prompt leaves a `<think>` open (the model continues thinking)."""
        tail = self.tokenizer.decode(list(ids[-8:]))
        return tail.rfind("<think>") > tail.rfind("</think>")


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


class ThinkSplitter:
    """Splits streamed text into ThinkDelta and TextDelta, with tags that may arrive in pieces."""

    def __init__(
        self, in_think: bool = False, open_tag: str = "<think>", close_tag: str = "</think>"
    ) -> None:
        self.in_think = in_think
        self.open_tag, self.close_tag = open_tag, close_tag
        self._held = ""
        self.think = ""
        self.answer = ""

    def feed(self, text: str) -> list[TextDelta | ThinkDelta]:
        out: list[TextDelta | ThinkDelta] = []
        buf = self._held + text
        self._held = ""
        while buf:
            tag = self.close_tag if self.in_think else self.open_tag
            at = buf.find(tag)
            if at >= 0:
                self._emit(out, buf[:at])
                buf = buf[at + len(tag) :]
                self.in_think = not self.in_think
                continue
            keep = _partial_suffix(buf, tag)
            self._emit(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            break
        return out

    def flush(self) -> list[TextDelta | ThinkDelta]:
        out: list[TextDelta | ThinkDelta] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    def _emit(self, out: list[TextDelta | ThinkDelta], text: str) -> None:
        if not text:
            return
        if self.in_think:
            self.think += text
            out.append(ThinkDelta(text))
        else:
            # Models put blank lines after </think>; an answer does not start with them.
            if not self.answer:
                text = text.lstrip("\n")
                if not text:
                    return
            self.answer += text
            out.append(TextDelta(text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
