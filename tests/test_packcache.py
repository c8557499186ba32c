"""A model folder on the CPU is quantized to Q8_0 once: the quantized weights are kept in kvrepl's
cache (backends/cpu/packcache.py, keyed in engine/placement.py) and the next load reads them.
With a tiny random Llama saved as a folder, through `models.load` as kvrepl loads it: the second
load quantizes nothing and gives bit-identical logits; a changed weight file, or a damaged or
truncated cache file, is quantized again (the damage said in one line) and the file rewritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from families import make_model
from makers import CHATML, make_tokenizer
from safetensors.torch import load_file, save_file

from kvrepl.backends.cpu import gguf_model
from kvrepl.engine import models

IDS = [1, 5, 9, 40, 7, 3, 22, 17]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny random Llama saved as a model folder, and a cache of its own (the compiled kernels
    shared with the suite's)."""
    kernels = models.cache_dir() / "kernels"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernels").symlink_to(kernels)
    monkeypatch.setenv("KVREPL_CACHE", str(cache))
    path = tmp_path / "llama"
    tok = make_tokenizer()
    tok.chat_template = CHATML
    model = make_model("llama", seed=5)  # untied: the head is a weight of its own
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def quantized(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The shapes gguf_model quantizes, one entry per weight."""
    calls: list[str] = []
    real = gguf_model.quantize

    def counting(w: torch.Tensor, qtype: str):
        calls.append(f"{tuple(w.shape)}")
        return real(w, qtype)

    monkeypatch.setattr(gguf_model, "quantize", counting)
    return calls


def load(folder: Path) -> tuple[torch.Tensor, models.LoadedModel]:
    loaded = models.load(str(folder), device="cpu", progress=False, context=256)
    assert type(loaded.model).__name__ == "FastModel"
    return loaded.model.forward(IDS, loaded.model.new_layers()), loaded


def kept_files() -> list[Path]:
    return sorted((models.cache_dir() / "converted").glob("*.safetensors"))


def test_the_second_load_reads_the_kept_weights_bit_for_bit(folder, quantized):
    first, a = load(folder)
    assert len(quantized) == 3 * 7 + 2  # every matrix: 3 layers of 7, the embedding, the head
    assert any("kept for the next start" in n for n in a.notes), a.notes
    assert len(kept_files()) == 1
    quantized.clear()
    second, b = load(folder)
    assert quantized == []
    assert any("read from the cache of an earlier start" in n for n in b.notes), b.notes
    assert torch.equal(first, second)
    assert a.fingerprint == b.fingerprint


def test_a_changed_weight_file_is_quantized_again(folder, quantized):
    first, _ = load(folder)
    old = kept_files()
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    quantized.clear()
    changed, b = load(folder)
    assert len(quantized) == 3 * 7 + 2
    assert any("kept for the next start" in n for n in b.notes), b.notes
    assert not torch.equal(first, changed)
    assert len(kept_files()) == 1 and kept_files() != old  # the old one can never be read again
    quantized.clear()
    again, _ = load(folder)
    assert quantized == [] and torch.equal(changed, again)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "garbage"])
def test_a_damaged_kept_file_is_said_in_one_line_and_written_again(folder, quantized, damage):
    first, _ = load(folder)
    (kept,) = kept_files()
    data = bytearray(kept.read_bytes())
    if damage == "flipped":  # a byte in the middle of the weights' data
        data[len(data) * 2 // 3] ^= 0x40
    elif damage == "truncated":
        data = data[: len(data) - 1000]
    else:
        data = bytearray(b"not safetensors at all" * 10)
    kept.write_bytes(bytes(data))
    quantized.clear()
    second, b = load(folder)
    assert len(quantized) == 3 * 7 + 2
    said = [n for n in b.notes if "damaged" in n]
    assert len(said) == 1 and "\n" not in said[0] and "converting again" in said[0], b.notes
    assert "Error" not in said[0]  # in kvrepl's words, not the safetensors library's
    assert torch.equal(first, second)
    quantized.clear()
    third, c = load(folder)
    assert quantized == [] and torch.equal(first, third)
    assert not any("damaged" in n for n in c.notes)


def test_a_cache_folder_that_cannot_be_written_is_one_line_and_the_model_runs(folder, quantized):
    converted = models.cache_dir() / "converted"
    converted.mkdir()
    converted.chmod(0o555)
    try:
        if os.access(converted, os.W_OK):  # root writes anyway: take the folder's place instead
            converted.chmod(0o755)
            converted.rmdir()
            converted.write_text("a file where the folder would be")
        first, a = load(folder)
    finally:
        if converted.is_dir():
            converted.chmod(0o755)
    said = [n for n in a.notes if "could not be kept" in n]
    assert len(said) == 1 and "\n" not in said[0], a.notes
    assert not any("kept for the next start" in n for n in a.notes)
    quantized.clear()
    second, _ = load(folder)
    assert len(quantized) == 3 * 7 + 2 and torch.equal(first, second)
