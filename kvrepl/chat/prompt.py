"""Prompts: messages become token ids through the model's chat template (generated ids
become text again in engine/detokenize.py). Owns two things:

- `Prompt.render`: the chat template renders the control structure; message text is tokenized
  on its own with special tokens split, so text a user types that spells `<|im_end|>` stays
  plain text and can never become a control token. An answer that carries the ids it was
  generated as (`"ids"`) is rendered as exactly those ids where they spell its content, so the
  next turn finds them in the cache instead of a re-tokenization that differs.
- `ThinkSplitter`: `<think>...</think>` separated from the answer, also while streaming.

It never touches a KV cache and never samples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
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
    """Renders conversations for one tokenizer. `messages` are dicts with `role` and `content`,
    and optionally `ids`: the ids an answer was generated as."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise PromptError(
                "this model has no chat template, and no built-in one fits it (Gemma, Llama 3 "
                "and ChatML need their turn tokens): pass one with --chat-template FILE "
                "(a Jinja file such as the model card's template)"
            )
        self._control_ids = {
            tok.content: i for i, tok in tokenizer.added_tokens_decoder.items() if tok.content
        }
        # The tokens that carry the template's structure: special ones, and added ones the
        # template spells (`<think>` in Qwen3's). An answer's ids holding one are not used.
        self._structural = set(tokenizer.all_special_ids) | {
            i for lit, i in self._control_ids.items() if lit.strip() and lit in self.template
        }
        literals = sorted(self._control_ids, key=len, reverse=True)
        self._control_re = re.compile("(" + "|".join(map(re.escape, literals)) + ")" if literals
                                      else "(?!)")  # fmt: skip

    @property
    def supports_thinking(self) -> bool:
        """Whether the template has a thinking switch (`enable_thinking`)."""
        return "enable_thinking" in self.template

    def render_text(
        self,
        messages: Sequence[Mapping[str, Any]],
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
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Token ids for these messages: control tokens come from template text, never from
        message text."""
        return self.render_with_offsets(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )[0]

    def render_with_offsets(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> tuple[list[int], list[int]]:
        """`render`, plus where each message's text starts in the ids (-1 if the template left
        the message out): enough to name the turn a token position falls in."""
        stand_ins = [
            {"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)
        ]
        text = self.render_text(
            stand_ins, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        pieces = _SENTINEL_RE.split(text)
        indices = [int(x) for x in pieces[1::2]]
        if indices != sorted(set(indices)) or any(i >= len(messages) for i in indices):
            raise PromptError(
                "the chat template reorders or repeats messages; kvrepl cannot use it"
            )
        # Runs of plain text between the template's own control tokens are encoded whole (as the
        # model saw them in training); a control token is taken only from template text.
        ids: list[int] = []
        starts = [-1] * len(messages)
        run = ""
        marks: list[tuple[int, int]] = []  # (message index, char offset in run)
        for n, piece in enumerate(pieces):
            if n % 2 == 1:
                i = int(piece)
                own = self._own_ids(messages[i])
                if own is not None:  # the text before it is encoded alone, as its prompt was
                    self._flush(run, marks, ids, starts)
                    run, marks = "", []
                    starts[i] = len(ids)
                    ids += own
                    continue
                marks.append((i, len(run)))
                for part in self._unmatchable(messages[i]["content"]):
                    if part is None:  # a break: an added-token literal must not match here
                        self._flush(run, marks, ids, starts)
                        run, marks = "", []
                    else:
                        run += part
                continue
            for chunk in self._control_re.split(piece):
                if chunk in self._control_ids:
                    self._flush(run, marks, ids, starts)
                    run, marks = "", []
                    ids.append(self._control_ids[chunk])
                else:
                    run += chunk
        self._flush(run, marks, ids, starts)
        return ids, starts

    def _own_ids(self, message: Mapping[str, Any]) -> list[int] | None:
        """The ids a message was generated as, if they are exactly its content: they decode to
        the text rendered here (a template or a splitter may have rewritten it, e.g. dropped
        thinking) and hold no structural token. An added token that is only vocabulary (an
        HTML tag, a run of newlines) may stay. None: tokenize the text instead."""
        ids = message.get("ids")
        if not ids:
            return None
        ids = [int(i) for i in ids]
        vocab = len(self.tokenizer)
        if any(not 0 <= i < vocab or i in self._structural for i in ids):
            return None
        text = self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)  # fmt: skip
        return ids if text == message["content"] else None

    def _flush(self, run: str, marks: list[tuple[int, int]], ids: list[int],
               starts: list[int]) -> None:  # fmt: skip
        """Encode one run of plain text; a message's start is the token holding its first char."""
        if not run:
            for i, _ in marks:
                starts[i] = len(ids)
            return
        enc = self.tokenizer(run, add_special_tokens=False, split_special_tokens=True,
                             return_offsets_mapping=True)  # fmt: skip
        for i, at in marks:
            starts[i] = len(ids) + next(
                (t for t, (_, end) in enumerate(enc.offset_mapping) if end > at),
                len(enc.input_ids),
            )
        ids += enc.input_ids

    def _unmatchable(self, content: str) -> list[str | None]:
        """`content` cut (None marks a cut) inside every added-token literal it spells, so that
        no literal, special or not (`<think>`), can match when it is encoded."""
        out: list[str | None] = []
        pos = 0
        for m in self._control_re.finditer(content):
            cut = m.start() + 1
            out += [content[pos:cut], None]
            pos = cut
        out.append(content[pos:])
        return out

    def _encode(self, text: str) -> list[int]:
        """Plain text to ids: no added-token literal in it becomes a control token."""
        ids: list[int] = []
        self._flush_parts(self._unmatchable(text), ids)
        return ids

    def _flush_parts(self, parts: list[str | None], ids: list[int]) -> None:
        buf = ""
        for part in [*parts, None]:
            if part is None:
                if buf:
                    ids += self.tokenizer(buf, add_special_tokens=False,
                                          split_special_tokens=True).input_ids  # fmt: skip
                buf = ""
            else:
                buf += part

    def count_tokens(self, text: str) -> int:
        """How many tokens a message text takes (before template overhead)."""
        return len(self._encode(text))

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
