"""The tiny test tokenizer and models, made here in memory: a byte-level BPE tokenizer with ChatML
control tokens (or Qwen3's thinking template), and a 3-layer random Llama."""

from __future__ import annotations

import os

import torch

# KVREPL_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (checked once on a lent machine).
TEST_DEVICE = os.environ.get("KVREPL_TEST_DEVICE", "cpu")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A thinking template as Qwen3's behaves: `enable_thinking=false` opens the answer with an empty
# think block, and an earlier answer is rendered without its thinking.
THINKING = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + message['content'].split('</think>')[-1].lstrip('\n')"
    " + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def make_tokenizer(
    specials: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos: str = "<|im_end|>",
    template: str | None = CHATML,
):
    """A small byte-level BPE tokenizer trained in memory: ChatML control tokens and template,
    unless told other `specials` (the first is the padding token) and another `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "The capital of France is Paris. Hello there, how are you?",
        "user assistant system think caches keys values tokens prefix",
        "Ünïcödé text: naïve café 東京 🙂 and more words for merges",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=specials[0])
    others = [t for t in specials if t not in (eos, specials[0])]
    fast.add_special_tokens({"additional_special_tokens": others})
    fast.chat_template = template
    return fast


def make_thinking_tokenizer():
    """The test tokenizer with `<think>`/`</think>` added (not special, as in Qwen3's) and the
    thinking template."""
    tok = make_tokenizer(template=THINKING)
    tok.add_tokens(["<think>", "</think>"])
    return tok


def make_tiny_model(vocab_size: int, seed: int = 0, layer_types: list[str] | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval().to(TEST_DEVICE)
