"""Shared fixtures: a tiny random model with a tokenizer made here (fast tests), and the real
embedded model, loaded once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
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


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own store and no config file; the model conversion cache stays
    shared. The per-user folders point into tmp_path too, so that a child process started
    without KVREPL_* variables never reads or writes the user's own (Linux: XDG)."""
    home = tmp_path / "store"
    monkeypatch.setenv("KVREPL_HOME", str(home))
    monkeypatch.setenv("KVREPL_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return home


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


@pytest.fixture(scope="session", autouse=True)
def _embedded_model_converted(request: pytest.FixtureRequest) -> None:
    """Dequantize the embedded GGUF once, before any test starts kvrepl processes: on a fresh
    machine, several processes would otherwise each convert it at the same time. Skipped where
    no selected test needs the real model (a GPU run of `-m "not model"`, which has no GGUF)."""
    from kvrepl import models

    if request.config.getoption("-m") == "not model":
        return
    models.convert_gguf(models.embedded_gguf(), progress=False)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread. On a shared 2-core machine two OpenMP threads spin against each other
    and against other processes: the tiny model ran 50x slower and the real one 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 3-layer random Llama and a byte-level tokenizer. Fast."""
    tok = make_tokenizer()
    return make_tiny_model(len(tok)), tok


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch):
    """script(*answers): the next engine streams generate exactly these ids, one list each (end
    it with an end token, or let max_tokens cut it), in place of sampling. The model still
    computes the K/V of every token it is fed."""
    queue: list[list[int]] = []

    class Scripted:
        def __init__(self, *args: object) -> None:
            self.ids = iter(queue.pop(0))

        def seen(self, ids: object) -> None:
            pass

        def next(self, logits: object) -> int:
            return next(self.ids)

    monkeypatch.setattr("kvrepl.engine.Sampler", Scripted)
    return lambda *answers: queue.extend(list(a) for a in answers)


@pytest.fixture(scope="session")
def real():
    """The embedded SmolLM2-135M-Instruct as kvrepl runs it by default (the CPU fast path: the
    GGUF's own Q4_1/Q8_0 weights), loaded once for the whole test session."""
    from kvrepl import models

    return models.load(progress=False)


@pytest.fixture(scope="session")
def real32():
    """The embedded model dequantized to float32 (`--dtype float32`), loaded once."""
    from kvrepl import models

    return models.load(dtype="float32", progress=False)


@pytest.fixture(params=["real", "real32"])
def real_any(request):
    """The real model in each mode kvrepl ships: the fast path and float32."""
    return request.getfixturevalue(request.param)
