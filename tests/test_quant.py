"""Tests for quant.py's repacking of every GGUF type the fast path takes: random blocks of each
type and every tensor of the two real GGUF files dequantize bit for bit as gguf-py does; row
reordering and interleaving change no weight; and on the block types added for the common
downloads (Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS) the native matmul is within its int16 activation
rounding of a float64 reference, and the scalar fallback equals the AVX2 kernels bit for bit;
and the values and layouts made at load by repack.c are numpy's and torch's bytes."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from makers import F16_FIELDS, gemma_gguf, random_blocks

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.quant import Packed, QuantError, pack
from kvrepl.engine import models

# byte offsets of each block type's float16 fields (scales d, dmin), as ggml lays them out
NEW = ["Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"]


def gguf_type(qtype: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[qtype]


def reference(raw: np.ndarray, qtype: str, n: int) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(raw.reshape(n, -1), gguf_type(qtype)).astype(np.float32))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, qtype: str) -> None:
    """Equal bit for bit. Q4_0's u4 form computes (q - 8) * d as q * d - 8 * d, whose zeros are
    +0 where gguf-py's may be -0: there, equal as numbers and every other bit the same."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    if qtype == "Q4_0":
        assert torch.equal(got, want)
        same = got.view(torch.int32) == want.view(torch.int32)
        assert bool((same | (want == 0)).all())
    else:
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("qtype", list(F16_FIELDS))
def test_random_blocks_dequantize_as_gguf_py_does(qtype):
    n, k = 12, 1024
    raw = random_blocks(qtype, n, k, np.random.default_rng(sorted(F16_FIELDS).index(qtype)), True)
    assert_bits_equal(pack(raw, qtype, n, k).dequantize(), reference(raw, qtype, n), qtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"])
def test_gguf_py_quantized_weights_dequantize_as_gguf_py_does(qtype):
    from gguf.quants import quantize

    n, k = 16, 512
    w = np.random.default_rng(5).standard_normal((n, k)).astype(np.float32)
    raw = quantize(w, gguf_type(qtype)).view(np.uint8)
    assert_bits_equal(pack(raw, qtype, n, k).dequantize(), reference(raw, qtype, n), qtype)


def test_a_wrong_field_would_show():
    """The comparison sees one flipped bit of a packed value or scale (it can fail)."""
    raw = random_blocks("Q5_K", 4, 256, np.random.default_rng(6), False)
    p = pack(raw, "Q5_K", 4, 256)
    p.q[2, 77] ^= 1
    assert not torch.equal(p.dequantize(), reference(raw, "Q5_K", 4))
    p = pack(raw, "Q5_K", 4, 256)
    p.sc[1, 3, 0] += 1.0
    assert not torch.equal(p.dequantize(), reference(raw, "Q5_K", 4))


REAL = {  # the suite's two real files: how each is found, and its tensor types
    "smollm2": (models.embedded_gguf, {"F32", "Q4_1", "Q8_0"}),
    "gemma3": (gemma_gguf, {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}),
}


@pytest.mark.model
@pytest.mark.parametrize("name", list(REAL))
def test_every_tensor_of_the_real_files_dequantizes_as_gguf_py_does(name):
    """Every tensor, located by gguf-py's reader, packed whole and compared whole, but for the
    embedding's rows: all of SmolLM2's, and a random 16384 of Gemma's 262144 (all: +15 s)."""
    from gguf import GGUFReader

    find, types = REAL[name]
    seen, rng = set(), np.random.default_rng(12)
    for t in GGUFReader(find()).tensors:
        qtype, k, n = t.tensor_type.name, int(t.shape[0]), int(np.prod(t.shape[1:]))
        raw = np.asarray(t.data).view(np.uint8).reshape(n, -1)
        p = pack(raw, qtype, n, k)
        rows = np.arange(n)
        if n > 65536:
            rows = np.sort(np.concatenate([[0, n - 1], rng.choice(n, 16384, replace=False)]))
            p = p.rows(rows)
        assert_bits_equal(p.dequantize(), reference(raw[rows], qtype, len(rows)), qtype)
        seen.add(qtype)
    assert seen == types


def test_unsupported_types_are_refused_in_one_line():
    with pytest.raises(QuantError, match="^tensor type IQ2_XXS is not supported by the fast path$"):
        pack(np.zeros(66, np.uint8), "IQ2_XXS", 1, 256)
    with pytest.raises(QuantError, match="row of 640 weights does not split into blocks of 256"):
        pack(np.zeros(2 * 176 * 5, np.uint8), "Q5_K", 2, 640)


# ---------------------------------------------------------------------------------------------
# layouts of the new types


@pytest.mark.parametrize("qtype", NEW)
def test_rows_and_interleaving_keep_every_weight(qtype):
    n, k = 16, 512
    p = pack(random_blocks(qtype, n, k, np.random.default_rng(7), True), qtype, n, k)
    w = p.dequantize()
    assert (p.fmt, p.block) == ("i8", 16 if qtype in ("Q2_K", "Q3_K") else 32)
    il = p.interleaved()
    assert il.group == 16 and not torch.equal(il.q, p.q)
    assert torch.equal(il.canonical().q, p.q) and torch.equal(il.canonical().sc, p.sc)
    assert torch.equal(il.dequantize(), w)
    order = np.random.default_rng(8).permutation(n)
    assert torch.equal(p.rows(order).dequantize(), w[order])
    assert torch.equal(il.rows(order).dequantize(), w[order])


# ---------------------------------------------------------------------------------------------
# kernels on the new types


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    return native.kernels(models.cache_dir())


@pytest.fixture(scope="module")
def scalar_kernels() -> native.Kernels:
    """The portable fallback, built for a baseline x86-64 (no AVX2) on this machine."""
    flags = [f for f in native.FLAGS if f != "-march=native"] + ["-march=x86-64"]
    return native.kernels(models.cache_dir(), flags)


def matmul(kern: native.Kernels, x: torch.Tensor, p: Packed) -> torch.Tensor:
    p = p.interleaved()  # the kernels' layout
    out = torch.empty(x.shape[0], p.n)
    w = native.weight(p.fmt, p.q, p.sc, p.n, p.k, p.block, p.group, p.dd, p.mins)
    kern.matmul(x.data_ptr(), x.shape[0], x.shape[1], ctypes.pointer(w), out.data_ptr(), p.n,
                None, 0)  # fmt: skip
    return out


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[m, n] bound on |kernel - exact|: x is rounded per block of 32 to steps of amax / 32767
    (at most half a step each, one step allowed), plus float32 accumulation."""
    xd, wd = x.double(), w.double()
    step = xd.abs().reshape(x.shape[0], -1, 32).amax(-1) / 32767
    wsum = wd.abs().reshape(w.shape[0], -1, 32).sum(-1)
    return step @ wsum.T + 1e-6 * (xd.abs() @ wd.abs().T)


@pytest.mark.parametrize("qtype", NEW)
def test_matmul_is_within_activation_rounding_of_float64(kernels, qtype):
    n, k = 36, 512
    p = pack(random_blocks(qtype, n, k, np.random.default_rng(9), False), qtype, n, k)
    w = p.dequantize()
    x = torch.from_numpy(np.random.default_rng(10).standard_normal((7, k)).astype(np.float32))
    exact = x.double() @ w.double().T
    bound = activation_bound(x, w)
    for q in (p, p.interleaved()):
        got = matmul(kernels, x, q).double()
        assert bool(((got - exact).abs() <= bound).all()), (got - exact).abs().max()
        assert torch.equal(matmul(kernels, x[3:4].contiguous(), q)[0], got[3].float())
    assert bound.max() < 1e-3 * exact.abs().max()  # the bound is tight enough to mean something


def test_scalar_fallback_equals_the_vector_kernels_on_the_new_types(kernels, scalar_kernels):
    """The scalar build against this machine's default (AVX-512 where it has it) and its AVX2
    build, bit for bit, on every new type."""
    assert scalar_kernels.isa == "scalar"
    avx2 = native.kernels(models.cache_dir(), native.flags_for("avx2"))
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal((5, 512)).astype(np.float32))
    for qtype in NEW:
        p = pack(random_blocks(qtype, 12, 512, rng, False), qtype, 12, 512)
        for q in (p, p.interleaved()):
            want = matmul(scalar_kernels, x, q)
            assert torch.equal(matmul(kernels, x, q), want), qtype
            assert torch.equal(matmul(avx2, x, q), want), qtype


# ---------------------------------------------------------------------------------------------
# the values and the layout made at load by repack.c: numpy's and torch's bytes


@pytest.mark.parametrize("qtype", list(F16_FIELDS))
def test_values_and_layouts_made_in_c_are_the_references_bytes(kernels, qtype):
    """Every type's values (numpy's packers) and its narrowest layout (lanes.py's torch), made by
    repack.c instead: the same bytes, for rows short of a group of 16, past one and past two."""
    rng = np.random.default_rng(11)
    for n in (1, 17, 37):
        raw = random_blocks(qtype, n, 512, rng, False)
        want, got = pack(raw, qtype, n, 512), pack(raw, qtype, n, 512, kernels)
        assert got.q.dtype == want.q.dtype and torch.equal(got.q, want.q)
        a, b = want.interleaved(), got.interleaved(kernels=kernels)
        assert (a.fmt, a.mins) == (b.fmt, b.mins) and torch.equal(a.sc, b.sc)
        assert a.q.shape == b.q.shape and torch.equal(a.q, b.q)


@pytest.mark.parametrize("span", [(-32, 31), (-16, 15), (0, 31), (-128, 127)])
def test_every_bit_of_a_value_reaches_its_place_in_the_c_layout(kernels, span):
    """Values over the whole range of each layout (i6, i5, u5, i8; u4 from i6's nibbles), rows
    past a group: repack.c against lanes.py bit for bit, and back to the values."""
    lo, hi = span
    q = torch.from_numpy(np.random.default_rng(12).integers(lo, hi + 1, (37, 96)).astype(np.int8))
    p = Packed("i8", q, torch.ones(37, 3, 2), 37, 96)
    a, b = p.interleaved(), p.interleaved(kernels=kernels)
    assert a.fmt == b.fmt == {-32: "i6", -16: "i5", 0: "u5", -128: "i8"}[lo]
    assert torch.equal(a.q, b.q) and torch.equal(b.canonical().q, q)
    nibbles = np.random.default_rng(13).integers(0, 256, (37, 48)).astype(np.uint8)
    nibbles = torch.from_numpy(nibbles)
    u4 = Packed("u4", nibbles, torch.ones(37, 3, 2), 37, 96)
    assert torch.equal(u4.interleaved().q, u4.interleaved(kernels=kernels).q)


def test_a_value_that_is_no_iq4_level_keeps_bytes_in_c_as_in_torch(kernels):
    """IQ4 levels become 4-bit indices; one value that is no level, past the first 4,096 (which
    lanes.py looks at first), keeps the bytes' layout in repack.c as in torch."""
    from kvrepl.backends.cpu.quant import IQ4NL_VALUES

    idx = np.random.default_rng(14).integers(0, 16, (37, 512))
    q = torch.from_numpy(IQ4NL_VALUES[idx])
    p = Packed("i8", q, torch.stack([torch.ones(37, 16), torch.zeros(37, 16)], -1), 37, 512)
    assert p.interleaved(kernels=kernels).fmt == p.interleaved().fmt == "n4"
    assert torch.equal(p.interleaved(kernels=kernels).q, p.interleaved().q)
    q[36, 511] = 0
    assert p.interleaved(kernels=kernels).fmt == p.interleaved().fmt == "i8"
