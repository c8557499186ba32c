"""Every backend through the doors users use: a turn and every read-only command (/stats first:
it crashed on the GPU path) on the CPU fast path, the GPU path's logic (torch backend) and the
transformers fallback; a model folder on the CPU takes the fast path, converted once at load, and
`--dtype float32` keeps transformers; the context setting sizes the cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from families import make_model
from helpers import Harness, lines_of, make_harness, tiny_loaded

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.gguf_model import from_hf
from kvrepl.backends.describe import Arch, context_for
from kvrepl.backends.gpu.model import GpuModel
from kvrepl.config import Settings
from kvrepl.engine import models, placement

SETTINGS = Settings(temperature=0.0, max_tokens=6, kv_budget_mb=64)


def _backend(kind: str, tiny) -> object:
    model, _ = tiny
    if kind == "fast":
        return from_hf(model, "Q8_0", native.kernels(models.cache_dir()), 512)
    if kind == "gpu-logic":
        return GpuModel(model, 512, backend="torch")
    return model


@pytest.mark.parametrize("kind", ["fast", "gpu-logic", "transformers"])
def test_every_command_works_on_every_backend(kind, tiny, tmp_path: Path):
    loaded = dataclasses.replace(tiny_loaded(tiny), model=_backend(kind, tiny))
    h: Harness = make_harness(tmp_path / "home", loaded, settings=SETTINGS)
    try:
        h.run("hello there", "and again")
        rows = dict(line.split("\t") for line in lines_of(h.run("/stats")))
        want = {"fast": "kvrepl-kernels", "gpu-logic": "torch GPU kernels",
                "transformers": "transformers' kernels"}  # fmt: skip
        assert want[kind] in rows["weights"]
        held = int(rows["in memory"].split()[0].replace(",", ""))
        assert held == len(h.rt.engine.pc.ids) > 0
        for line in ("/history", "/sessions", "/branches", "/export md", "/undo", "/retry"):
            out = h.run(line)
            assert "internal error" not in out and "Traceback" not in out, (line, out)
    finally:
        h.chat.close()


def test_the_fast_path_names_its_weights_in_stats(tiny, tmp_path: Path):
    fast = _backend("fast", tiny)
    fast.weight_types = "Q8_0 (converted at load)"
    assert fast.describe().startswith("Q8_0 (converted at load) weights, kvrepl-kernels")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved as a model folder, with a tokenizer and a chat template."""
    from makers import CHATML, make_tokenizer

    folder = tmp_path_factory.mktemp("llama")
    tok = make_tokenizer()
    tok.chat_template = CHATML
    model = make_model("llama")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_model_folder_on_the_cpu_takes_the_fast_path(llama_folder):
    loaded = models.load(str(llama_folder), device="cpu", progress=False, context=300)
    assert type(loaded.model).__name__ == "FastModel"
    assert loaded.model.weight_types.startswith(placement.HF_FAST_QTYPE)
    assert any("converted to Q8_0 at load" in n for n in loaded.notes), loaded.notes
    assert loaded.context_length == 300
    exact = models.load(str(llama_folder), device="cpu", dtype="float32", progress=False)
    assert type(exact.model).__name__ == "LlamaForCausalLM"
    assert exact.fingerprint != loaded.fingerprint  # a snapshot of one never restores the other
    ids = [1, 5, 9, 40, 7, 3]
    with torch.no_grad():
        want = exact.model(input_ids=torch.tensor([ids])).logits[0, -1]
    got = loaded.model.forward(ids, loaded.model.new_layers())
    assert int(got.argmax()) == int(want.argmax())
    assert float((got - want).abs().max() / want.abs().max()) < 0.05  # Q8_0, 8 bits a weight


def test_the_context_setting_sizes_the_cache_within_the_models_limit():
    arch = Arch.from_config(make_model("llama").config)  # 4,096 positions
    assert context_for(arch, 1000) == (1000, None)
    assert context_for(arch, 0) == (4096, None)
    assert context_for(arch, 100_000) == (4096, None)
    phi = Arch.from_config(make_model("phi3").config)
    phi.rope_type, phi.max_context = "longrope", 2048
    ctx, line = context_for(phi, 8192)
    assert ctx == 2048 and "longrope" in line


def test_the_context_setting_is_checked_where_it_is_given():
    from kvrepl.config import load_settings

    assert load_settings({"context": "2048"}).context == 2048
    with pytest.raises(Exception, match="context"):
        load_settings({"context": "-5"})


def test_a_gpu_context_counts_the_attention_scratch_beside_the_k_v(monkeypatch):
    """The GPU path's check: the K/V and the attention's partials of a prefill chunk (which grow
    with the context too) against the GPU's free memory, less a GiB; the context it names fits
    both (a fake CUDA device: CI has none)."""
    from types import SimpleNamespace

    import torch

    from kvrepl.errors import ModelError

    config = make_model("llama").config
    arch = placement.Arch.from_config(config)
    p = SimpleNamespace(device=SimpleNamespace(type="cuda"), element_size=lambda: 2)
    model = SimpleNamespace(config=config, parameters=lambda: iter([p]))
    kv = arch.kv_bytes(4096, 2)
    free = (1 << 30) + 2 * kv
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, free))
    placement.check_cache_fits(model, 4096)  # the K/V alone: fits
    placement.check_cache_fits(model, 4096, kv)  # with as much scratch: fits, just
    with pytest.raises(ModelError, match=r"needs .* of K/V and attention scratch .* --context"):
        placement.check_cache_fits(model, 4096, 2 * kv)
    try:
        placement.check_cache_fits(model, 4096, 3 * kv)
    except ModelError as e:
        fits = int(str(e).split("--context ")[1].split()[0].replace(",", ""))
    assert 0 < fits < 4096
    placement.check_cache_fits(model, fits, 3 * kv * fits // 4096)  # the context it names fits


def test_a_context_the_memory_cannot_hold_is_refused_in_one_line(monkeypatch):
    from kvrepl.errors import ModelError

    config = make_model("llama").config
    placement.check_memory_fits(config, 4096)  # 3 layers: a few MB
    monkeypatch.setattr(placement, "available_memory", lambda: 4096)
    with pytest.raises(ModelError, match=r"4,096-token context needs .* use --context 0 or less"):
        placement.check_memory_fits(config, 4096)


def test_weights_that_cannot_fit_are_refused_before_the_load_in_one_line(monkeypatch):
    """A GGUF file's weights (about its size once laid out) and its context, against the memory
    available: the weights alone too big, or the context too big beside them, each one line
    that says how much there is (and the context that fits)."""
    from kvrepl.errors import ModelError

    config = make_model("llama").config  # 3 layers, 2 kv heads of 16: 384 bytes a token
    mib = 2**20
    monkeypatch.setattr(placement, "available_memory", lambda: 10 * mib)
    placement.check_memory_fits(config, 4096, weights=8 * mib)  # 1.5 MiB of K/V: fits
    with pytest.raises(ModelError, match=r"^the model's weights need 0.0 GiB and 0.0 GiB"):
        placement.check_memory_fits(config, 16, weights=11 * mib)
    with pytest.raises(ModelError, match=r"context needs .* beside the weights' .* --context "
                                         r"5,120 or less$"):  # fmt: skip
        placement.check_memory_fits(config, 8192, weights=8 * mib)
    assert placement.available_memory() > 0  # this machine says (Linux: MemAvailable)
