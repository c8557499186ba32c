"""The GPU path over a GGUF file's own blocks (kvrepl/backends/gpu/qweights.py), on the CPU with
its torch reference (the Triton kernel is checked against it on a GPU: bench/bench_gpu.py
--check): the blocks dequantize as gguf-py does; a model over a GGUF file's Q8_0/Q4_0/Q4_1 blocks
computes what the GPU path computes over the same weights dequantized (the model it computed
before: transformers' GGUF loader dequantizes with gguf-py), bit for bit, Llama's Q/K rows in
transformers' order; reuse equals recomputation over it."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from families import make_model, write_gguf
from makers import random_blocks

from kvrepl.backends.gpu import qweights
from kvrepl.backends.gpu.model import GpuModel
from kvrepl.engine.engine import Engine, Sampling

QTYPES = ("Q8_0", "Q4_0", "Q4_1")


def _round_trip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w.detach().float().numpy(), kind)
    return torch.from_numpy(gguf.quants.dequantize(raw, kind).copy())


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_dequantize_as_gguf_py(qtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 256, generator=g) * 0.05).numpy()
    w[5, 40:72] = 0.0  # an all-zero block
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, kind)
    qw = qweights.from_blocks(raw, qtype, 48, 256)
    assert qw.shape == (48, 256) and qw.nbytes() == raw.nbytes
    want = torch.from_numpy(gguf.quants.dequantize(raw, kind).copy())
    assert torch.equal(qw.dequantize(), want)
    assert torch.equal(qw.dequantize(torch.bfloat16), want.to(torch.bfloat16))
    order = np.arange(48)[::-1].copy()
    assert torch.equal(qw.rows(order).dequantize(), want[order.tolist()])
    both = qweights.joined([qw, qw.rows(order)])
    assert torch.equal(both.dequantize(), torch.cat([want, want[order.tolist()]]))


def test_q4_k_blocks_dequantize_as_gguf_py():
    """Q4_K's sub-blocks of 32 kept as Q4_1 blocks (nibbles reordered, float32 d * sc and
    -(dmin * m)): the same float32 values as gguf-py's dequantization, then bf16 the same."""
    raw = random_blocks("Q4_K", 24, 512, np.random.default_rng(5), False)
    qw = qweights.from_blocks(raw, "Q4_K", 24, 512)
    assert qw.shape == (24, 512) and qw.kind == qweights.KINDS["Q4_1"]
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).copy())
    assert torch.equal(qw.dequantize(), want.reshape(24, 512))
    assert torch.equal(qw.dequantize(torch.bfloat16), want.reshape(24, 512).to(torch.bfloat16))
    order = np.arange(24)[::-1].copy()
    assert torch.equal(qw.rows(order).dequantize(), want.reshape(24, 512)[order.tolist()])


@pytest.mark.model
def test_a_q4_k_m_files_q4_k_matrices_are_read_as_gguf_py_reads_them():
    """Gemma 3 270M's Q4_K_M file: its Q4_K matrices (the attention outputs, rows of 1,024:
    the rows of 640 do not split into Q4_K's 256, and the file has them in other types), read
    by GGUFBlocks, are what gguf-py's reader and dequantizer give (three of them: the file's
    every tensor against gguf-py is test_quant's)."""
    from makers import gemma_gguf

    path = gemma_gguf()
    blocks = qweights.GGUFBlocks(path, None, "cpu")  # (GGUFReader takes 12 s on the vocabulary)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    seen = 0
    for name, (qtype, dims, off) in blocks.tensors.items():
        if qtype == "Q4_K":
            k, n = int(dims[0]), int(np.prod(dims[1:]))
            raw = np.asarray(data[off : off + n * k // 256 * 144]).reshape(-1, 144)
            want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(n, k)
            assert torch.equal(blocks.tensor(name).dequantize(), torch.from_numpy(want))
            seen += 1
            if seen == 3:
                break
    assert seen == 3, seen


def test_matrices_of_other_types_are_not_joined():
    w = np.zeros((32, 64), dtype=np.float32)
    a = qweights.from_blocks(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), "Q8_0",
                             32, 64)  # fmt: skip
    b = qweights.from_blocks(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), "Q4_0",
                             32, 64)  # fmt: skip
    assert qweights.joined([a, b]) is None and qweights.joined([a, None]) is None
    assert qweights.joined([a, a]).shape == (64, 64)


def _dequantized(model, qtype):
    """The model with every matrix the GGUF file holds in blocks (not the embedding, which the
    GPU path keeps as the model's) replaced by its gguf-py round trip."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                p.copy_(_round_trip(p, qtype))
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_the_blocks_compute_the_dequantized_model(family, qtype, tmp_path):
    model = make_model(family, seed=2)
    path = write_gguf(model, family, tmp_path / "m.gguf", qtype)
    ref = GpuModel(_dequantized(model, qtype), 256, backend="torch")
    blocks = qweights.GGUFBlocks(path, ref.arch, "cpu")
    gm = GpuModel(model, 256, backend="torch", blocks=blocks)
    n = ref.arch.n_layers
    assert gm.quantized == {qtype: 4 * n + 1}
    assert f"{4 * n + 1} {qtype}" in gm.describe()
    ids = [3 + (7 * i) % 200 for i in range(30)]
    assert torch.equal(gm.forward(ids, gm.new_layers()), ref.forward(ids, ref.new_layers()))


def test_reuse_equals_recompute_over_the_blocks(tmp_path):
    from makers import make_tokenizer

    tok = make_tokenizer()
    model = make_model("llama", seed=4)
    path = write_gguf(model, "llama", tmp_path / "m.gguf", "Q4_1")
    arch_of = GpuModel(model, 256, backend="torch").arch
    gm = GpuModel(model, 256, backend="torch",
                  blocks=qweights.GGUFBlocks(path, arch_of, "cpu"))  # fmt: skip
    reuse = Engine(gm, tok, end_ids=set(), context_length=256)
    fresh = Engine(gm, tok, end_ids=set(), context_length=256, reuse=False)
    ids: list[int] = []
    for turn in range(3):
        ids = ids + [5 + (11 * turn + j) % 250 for j in range(20)]
        list(reuse.stream(ids, Sampling(temperature=0, max_tokens=6)))
        list(fresh.stream(ids, Sampling(temperature=0, max_tokens=6)))
        assert reuse.progress.generated == fresh.progress.generated
        ids = ids + reuse.progress.generated


@pytest.mark.parametrize("choice", ["gguf", "bf16"])
def test_gpu_weights_chooses_the_files_blocks(choice, tmp_path, monkeypatch):
    """A .gguf on CUDA: --gpu-weights gguf hands the GPU path the file, bf16 (the default)
    does not; the fingerprints differ where blocks are kept (not bit-identical on a GPU)."""
    from makers import make_tiny_model, make_tokenizer

    from kvrepl.engine import models, placement

    tok = make_tokenizer()
    model = make_tiny_model(len(tok), seed=1, tied=False)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    got = {}

    def fake_gpu(m, ctx, gguf=None):
        got["gguf"] = gguf
        m.quantized = {"Q8_0": 1} if gguf else {}
        return m

    monkeypatch.setattr(models, "pick_device", lambda d: "cuda")
    monkeypatch.setattr(models, "_transformers",
                        lambda *a: (model, tok, "cuda", torch.bfloat16, False))  # fmt: skip
    monkeypatch.setattr(placement, "gpu", fake_gpu)
    loaded = models.load(str(path), device="cuda", context=256, gpu_weights=choice)
    assert got["gguf"] == (path.resolve() if choice == "gguf" else None)
    other = models.load(str(path), device="cuda", context=256,
                        gpu_weights="bf16" if choice == "gguf" else "gguf")  # fmt: skip
    assert loaded.fingerprint != other.fingerprint
