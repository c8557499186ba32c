"""Built-in chat templates, for a model that carries none (a GGUF file without one): picked by
architecture, as llama.cpp does. Owns the templates and the rule that picks one; models.py sets
the pick on the tokenizer when it loads a model and says in one line which was used.

Each template is written from its format's documentation and renders message content as it is
(prompt.py tokenizes message text on its own). A template is picked only when the tokenizer has
the format's turn tokens as added tokens, so that they become control tokens, never text.
Nothing here loads, tokenizes or renders.
"""

from __future__ import annotations

from typing import Any

_BOS = "{% if bos_token is defined %}{{ bos_token }}{% endif %}"

# Gemma (ai.google.dev, "Gemma formatting and system instructions"): turns of `user` and
# `model`; no system role, so a system prompt opens the first user turn, as Gemma 3's own
# template does.
GEMMA = (
    _BOS + "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content']"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Llama 3 (llama.com, "Llama 3 model card: prompt format"): a header per message, then a blank
# line, the content and `<|eot_id|>`.
LLAMA3 = (
    _BOS + "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# ChatML (OpenAI's chatml.md, as Qwen and SmolLM use it): the last resort.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GEMMA_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
# (name, model types it is for (None: any), the tokens it needs, the template), in order of
# preference. Each format's end marker is among prompt.py's end-of-turn tokens.
BUILTINS: tuple[tuple[str, tuple[str, ...] | None, tuple[str, ...], str], ...] = (
    ("Gemma", GEMMA_TYPES, ("<start_of_turn>", "<end_of_turn>"), GEMMA),
    ("Llama 3", ("llama",), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3),
    ("ChatML", None, ("<|im_start|>", "<|im_end|>"), CHATML),
)


def pick(model_type: str, tokenizer: Any) -> tuple[str, str] | None:
    """(name, template) of the built-in for this architecture and vocabulary, or None when none
    fits (then the model needs --chat-template)."""
    added = {tok.content for tok in tokenizer.added_tokens_decoder.values()}
    for name, types, needs, template in BUILTINS:
        if (types is None or model_type in types) and set(needs) <= added:
            return name, template
    return None


def settle(tokenizer: Any, config: Any, chat_template: str | None) -> list[str]:
    """Give the tokenizer the chat template the model runs with: the one passed
    (--chat-template), else its own, else a built-in picked by architecture, with a line saying
    which. None fits: it stays without, and the prompt refuses it with a hint."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        return []
    if getattr(tokenizer, "chat_template", None):
        return []
    picked = pick(getattr(config, "model_type", "") or "", tokenizer)
    if picked is None:
        return []
    name, template = picked
    tokenizer.chat_template = template
    return [f"chat template: built-in {name} (the model has none)"]
