"""Conformance, family × backend: every decoder family kvrepl computes itself gives the logits of
transformers' own forward, on every path (the CPU fast path built from a transformers model and
from a GGUF file as llama.cpp names it, the GPU path's logic through its torch backend), and the
batch-invariant paths give bit-identical logits and K/V whether a prompt runs in one prefill, in
chunks, or token by token. On a GPU, `bench/bench_gpu.py --check` runs the same families on the
Triton kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES, make_model, reference_logits, write_gguf

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.gguf_model import GGUFTensors, build, from_hf
from kvrepl.backends.describe import Arch, Unsupported
from kvrepl.engine import models

IDS = [1, 17, 250, 33, 90, 5, 311, 64, 12, 7, 199, 42, 3, 88, 150, 21, 9, 260, 77, 31]


@pytest.fixture(scope="module")
def kernels():
    return native.kernels(models.cache_dir())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _run(model, ids: list[int], chunks: list[int]) -> tuple[torch.Tensor, list]:
    layers, pos, logits = model.new_layers(), 0, None
    for n in chunks:
        logits = model.forward(ids[pos : pos + n], layers)
        pos += n
    return logits, layers


def _kv(layers, n: int) -> list[torch.Tensor]:
    return [t[..., :n, :] for layer in layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_fast_path_computes_what_transformers_computes(family, kernels):
    model = make_model(family)
    fast = from_hf(model, "F32", kernels, 4096)
    want = reference_logits(model, IDS)
    got, _ = _run(fast, IDS, [len(IDS)])
    # float32 weights, float16 K/V: a dropped bias or norm is an error of order 1, this is 1e-3
    assert _rel(got, want) < 5e-3, family
    assert int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_as_llama_cpp_writes_it_computes_the_same_model(family, kernels, tmp_path: Path):
    model = make_model(family, seed=1)
    path = write_gguf(model, family, tmp_path / f"{family}.gguf")
    from_file = build(GGUFTensors(path), model.config, kernels, 4096)
    got, _ = _run(from_file, IDS, [len(IDS)])
    want = reference_logits(model, IDS)
    assert _rel(got, want) < 5e-3, family
    if not family.startswith("gemma"):  # Gemma's norms went through 1 + w and back
        same, _ = _run(from_hf(model, "F32", kernels, 4096), IDS, [len(IDS)])
        assert torch.equal(got, same)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("gemma")])
def test_a_quantized_gguf_holds_exactly_the_quantized_model(family, kernels, tmp_path: Path):
    """Q8_0 matrices written by gguf-py's quantizer under llama.cpp's names and layout (Q/K rows
    permuted for Llama) are read back as exactly the weights kvrepl quantizes itself: logits
    bit for bit."""
    model = make_model(family, seed=4)
    path = write_gguf(model, family, tmp_path / f"{family}-q8.gguf", qtype="Q8_0")
    got, _ = _run(build(GGUFTensors(path), model.config, kernels, 4096), IDS, [len(IDS)])
    same, _ = _run(from_hf(model, "Q8_0", kernels, 4096), IDS, [len(IDS)])
    assert torch.equal(got, same)
    assert _rel(got, reference_logits(model, IDS)) < 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_is_batch_invariant_on_every_family(family, kernels):
    fast = from_hf(make_model(family, seed=2), "Q8_0", kernels, 4096)
    whole, lw = _run(fast, IDS, [len(IDS)])
    chunked, lc = _run(fast, IDS, [7, 1, 9, 3])
    stepped, ls = _run(fast, IDS, [1] * len(IDS))
    assert torch.equal(whole, chunked) and torch.equal(whole, stepped)
    for a, b, c in zip(_kv(lw, len(IDS)), _kv(lc, len(IDS)), _kv(ls, len(IDS)), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_path_logic_computes_what_transformers_computes(family):
    from kvrepl.backends.gpu.model import GpuModel

    model = make_model(family, seed=3)
    gpu = GpuModel(model, 256, backend="torch")
    want = reference_logits(model, IDS)
    got, _ = _run(gpu, IDS, [len(IDS)])
    assert _rel(got, want) < 1e-4, family
    stepped, _ = _run(gpu, IDS, [5] + [1] * (len(IDS) - 5))
    assert _rel(stepped, want) < 1e-4, family


def test_a_mixture_of_experts_is_refused_in_one_line():
    import transformers

    config = transformers.Qwen2MoeConfig(hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(Unsupported, match="mixture of experts"):
        Arch.from_config(config)


def test_a_term_a_backend_does_not_compute_is_named():
    arch = Arch.from_config(make_model("gemma2").config)
    with pytest.raises(Unsupported, match="attention softcap"):
        arch.refusal("a backend", {"Gemma norms", "sliding windows", "GELU", "final softcap"})


def test_a_softcapped_verification_outside_inference_mode_after_one_inside(kernels):
    """Gemma 2's final softcap on every row of a verification writes into the logits buffer in
    place; the engine makes that buffer inside inference_mode, and a forward called outside it
    afterwards (a test, a tool) must still run, and give each row what a plain forward gives."""
    fast = from_hf(make_model("gemma2", seed=3), "F32", kernels, 4096)
    want = fast.forward(IDS[:9], fast.new_layers()).clone()
    layers = fast.new_layers()
    with torch.inference_mode():  # the buffers are made here, as inference tensors
        fast.forward(IDS[:5], layers, all_logits=True)
    rows = fast.forward(IDS[5:9], layers, all_logits=True)
    assert torch.equal(rows[-1], want)
