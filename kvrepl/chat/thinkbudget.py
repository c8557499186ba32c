"""The think budget (`think_budget` N): once an answer has thought for N tokens, the model is made
to close its thinking: the template's closing tag (`</think>` and the newlines the template puts
after it) is fed as forced tokens in place of sampled ones, and the answer goes on from there.

Owns: where an answer's text is (thinking or not, also when the model opens `<think>` itself)
and how many of its tokens were thinking, as the engine's `Steer` (engine.py asks after each
token, and feeds what it returns); and the ids of the close, read off the template. The forced
tokens are the answer's like any other (stored with it), so that a recompute of the same ids
gives the same cache. It never samples and never touches the cache.
"""

from __future__ import annotations

from kvrepl.chat.prompt import Prompt, ThinkSplitter
from kvrepl.errors import PromptError

OPEN_TAG, CLOSE_TAG = "<think>", "</think>"
# What follows the closing tag where the template does not say (Qwen3's and DeepSeek-R1's).
_DEFAULT_CLOSE = CLOSE_TAG + "\n\n"


class ThinkBudget:
    """One answer's thinking, counted in tokens; at `limit`, the close (`close`: its ids) is
    what comes next. `in_think`: the prompt leaves a `<think>` open."""

    def __init__(self, limit: int, close: list[int], *, in_think: bool) -> None:
        self.limit = limit
        self.close = list(close)
        self._where = ThinkSplitter(in_think, OPEN_TAG, CLOSE_TAG)
        self.thought = 0  # tokens generated inside the thinking
        self.cut_at: int | None = None  # the thinking's tokens when it was cut, if it was
        self._closing = False  # the close is on its way: no second one

    def after(self, token: int, text: str) -> list[int]:
        """`token` was taken and added `text`; the close when this token used up the budget."""
        was = self._where.in_think
        self._where.feed(text)
        if not (was and self._where.in_think):
            self._closing = False  # the tag came (or the text was never thinking)
            return []
        if self._closing:
            return []
        self.thought += 1
        if self.thought < self.limit:
            return []
        self._closing = True
        self.cut_at = self.cut_at or self.thought
        return list(self.close)

    def room(self) -> int | None:
        """Tokens that may follow before the close could be forced: what may be drafted."""
        if not self._where.in_think or self._closing:
            return None
        return self.limit - self.thought


def close_ids(prompt: Prompt) -> list[int]:
    """The ids of the thinking's close as the template writes it: its tag and the whitespace
    after it, where the template opens an answer with thinking off (`<think>\\n\\n</think>\\n\\n`
    in Qwen3's); else `</think>` and a blank line. The tag is taken as the vocabulary's token
    where it has one."""
    text = _DEFAULT_CLOSE
    if prompt.supports_thinking:
        try:
            shown = prompt.render_text([{"role": "user", "content": "x"}], enable_thinking=False)
        except PromptError:  # a template that wants more than one message: the default
            shown = ""
        at = shown.rfind(CLOSE_TAG)
        if at >= 0 and not shown[at + len(CLOSE_TAG) :].strip():
            text = shown[at:]
    return list(prompt.tokenizer(text, add_special_tokens=False).input_ids)


def think_budget(limit: int | None, prompt: Prompt, in_think: bool) -> ThinkBudget | None:
    """The budget for one answer, or None when there is none (`limit` 0 or None)."""
    if not limit:
        return None
    return ThinkBudget(limit, close_ids(prompt), in_think=in_think)
