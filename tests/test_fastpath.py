"""Tests for the CPU fast path: the GGUF block formats repacked exactly (quant.py), the kernels
(native/): results close to a float64 reference and bit-identical whatever the rows computed
with them, AVX-512, AVX2 and the scalar fallback bit-identical; the decoder (fastmodel.py) against
transformers on tiny models of each family it runs, quantized in the test; a GGUF file written
here and read back (gguf_model.py); and the fallback when the fast path cannot run (a real
process where no C compiler runs, end to end)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from makers import make_tokenizer

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.gguf_model import from_gguf, from_hf
from kvrepl.backends.cpu.quant import LAYOUT, Packed, pack, quantize
from kvrepl.backends.describe import gguf_qk_order
from kvrepl.engine import models
from kvrepl.engine.engine import Engine, Sampling
from kvrepl.errors import ModelError

QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # gguf-py quantizes these
ALL_TYPES = QUANTIZABLE + ["Q4_K", "Q6_K", "F16", "BF16"]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> native.Kernels:
    return native.kernels(models.cache_dir())


@pytest.fixture(scope="module")
def scalar_kernels() -> native.Kernels:
    """The portable fallback, built for a baseline x86-64 (no AVX2) on this machine."""
    return native.kernels(models.cache_dir(), native.flags_for("scalar"))


@pytest.fixture(scope="module")
def avx2_kernels() -> native.Kernels:
    """The AVX2 build (no AVX-512), whatever this CPU has beyond it."""
    return native.kernels(models.cache_dir(), native.flags_for("avx2"))


def cpu_isa() -> str:
    """The kernels' best instruction set that this CPU has, read from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(ln for ln in text.splitlines() if ln.startswith("flags")).split())
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512vnni" if "avx512_vnni" in flags else "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar"


def raw_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Bytes of a GGUF tensor of `qtype`: llama.cpp's quantizers where gguf-py has one, else
    random blocks with sane float16 scales (every bit pattern of the rest is a valid block)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    if qtype in QUANTIZABLE + ["F16", "BF16"]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        if qtype == "F16":
            return w.astype(np.float16).view(np.uint8)
        return gguf_quantize(w, GGMLQuantizationType[qtype])
    bs, nbytes = LAYOUT[qtype]
    raw = rng.integers(0, 256, size=(n * k // bs, nbytes), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        raw[:, 0:4] = scales
    else:
        raw[:, 208:210] = scales[:, :2]
    return raw


def desc(p: Packed):
    return ctypes.pointer(native.weight(p.fmt, p.q, p.sc, p.n, p.k, p.block, p.group, p.dd, p.mins))


def matmul(k: native.Kernels, x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x @ p^T by the kernels (a quantized p in their layout: interleaved, if it is not)."""
    p = p.interleaved()
    out = torch.empty(x.shape[0], p.n)
    k.matmul(x.data_ptr(), x.shape[0], x.shape[1], desc(p), out.data_ptr(), p.n, None, 0)
    return out


# ---------------------------------------------------------------------------------------------
# formats and kernels


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_packing_is_exact_for_every_format(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n, k = 24, 512
    raw = raw_blocks(qtype, n, k, np.random.default_rng(1))
    want = dequantize(raw.reshape(n, -1), GGMLQuantizationType[qtype]).astype(np.float32)
    got = pack(raw, qtype, n, k).dequantize()
    assert torch.equal(got, torch.from_numpy(want).reshape(n, k))


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("group", [1, 16])
def test_matmul_is_close_to_float64_and_batch_invariant(kernels, qtype, group):
    n, k = 40, 256
    p = pack(raw_blocks(qtype, n, k, np.random.default_rng(2)), qtype, n, k).interleaved(group)
    assert torch.equal(p.canonical().dequantize(), p.dequantize())
    w = p.dequantize().double()
    torch.manual_seed(0)
    x = torch.randn(70, k)
    whole = matmul(kernels, x, p)
    ref = x.double() @ w.T
    assert ((whole - ref).abs().max() / ref.abs().max()) < 1e-4
    for rows in (1, 3, 5, 9):  # every row computes bit for bit as it does in any batch
        assert torch.equal(matmul(kernels, x[:rows].contiguous(), p), whole[:rows])
    for m in (0, 37, 69):
        assert torch.equal(matmul(kernels, x[m : m + 1].contiguous(), p)[0], whole[m])


FACTORED = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


def test_k_quant_scales_kept_as_int8_give_the_float_scales_bits(kernels, avx2_kernels,
                                                                scalar_kernels):  # fmt: skip
    """The K-quants' and IQ4_XS's scales go to the kernels as int8 times their superblock's float
    (a quarter of a float32 scale's bytes: Q4_K 4.75 bits a weight, not 6), 8-bit values
    within -32..31 as 6 bits (Q6_K), within 0..31 or -16..15 as 5 (Q5_K; Q3_K, Q2_K), and
    IQ4's levels as their 4-bit indices (n4); the kernels rebuild each scale as that exact
    product and each value from its bits, so every output, on every instruction set and row
    count, and every embedding row, is bit for bit what float32 scales and bytes give."""
    from makers import random_blocks

    from kvrepl.backends.cpu.quant import _expand

    rng = np.random.default_rng(12)
    x = torch.randn(17, 512) * torch.logspace(-2, 2, 17).unsqueeze(1)
    for qtype in FACTORED:
        n = 40 if qtype != "Q4_K" else 21  # a group padded with rows of zeros too
        p = pack(random_blocks(qtype, n, 512, rng, wide=False), qtype, n, 512)
        assert p.factors is not None and torch.equal(_expand(*p.factors, p.block), p.sc)
        small = p.interleaved()
        plain = p.interleaved(compact=False)  # float32 scales, a byte a value
        assert small.sc.dtype == torch.int8 and plain.sc.dtype == torch.float32, qtype
        assert small.fmt == {"IQ4_XS": "n4", "Q4_K": "u4", "Q6_K": "i6", "Q5_K": "u5"}.get(
            qtype, "i5")  # Q2_K's 0..3 and Q3_K's -4..3 as i5: 5 bits  # fmt: skip
        assert plain.fmt == p.fmt, qtype  # compact=False: a byte a value
        assert small.nbytes() < plain.nbytes() * 0.8, qtype
        assert torch.equal(small.canonical().q, p.q), qtype
        assert torch.equal(small.canonical().sc, p.sc) and torch.equal(
            small.canonical().factors[1], p.factors[1])  # fmt: skip
        for k in (kernels, avx2_kernels, scalar_kernels):
            for rows in (1, 2, 5, 17):
                want = matmul(k, x[:rows].contiguous(), plain)
                assert torch.equal(matmul(k, x[:rows].contiguous(), small), want), (qtype, rows)
            ids = torch.tensor([0, 3, n - 1], dtype=torch.int64)
            got, want = (torch.empty(3, 512) for _ in "ab")
            for w, out in ((small, got), (plain, want)):
                k.rows(desc(w), ids.data_ptr(), 3, out.data_ptr(), 512, 1.0)
            assert torch.equal(got, want) and torch.equal(want, p.dequantize()[ids]), qtype
    # and a scale that is not such a product keeps its float32 (the check is not vacuous): the
    # packers make each scale as that product and say so; a Packed that does not say so is
    # checked
    p = pack(random_blocks("Q6_K", 16, 256, rng, wide=False), "Q6_K", 16, 256)
    assert p.expanded and p.interleaved().sc.dtype == torch.int8
    p.expanded = False
    assert p.interleaved().sc.dtype == torch.int8
    p.sc[0, 0, 0] = torch.nextafter(p.sc[0, 0, 0], torch.tensor(1.0))
    assert p.interleaved().sc.dtype != torch.int8


def test_weights_without_mins_keep_none_and_give_the_same_bits(kernels, avx2_kernels,
                                                                scalar_kernels):  # fmt: skip
    """Q8_0 and Q6_K have no mins, and Q4_0's (its values kept as 0..15) are -8 times the scale:
    the kernels' layout keeps their scales alone (Q8_0 8.5 bits a weight and Q4_0 4.5, as in
    the file; Q6_K 6.625 with its superblock float, not 7.25; IQ4_NL 4.5 as 4-bit indices to
    its levels, not 8.5 as their bytes), and every output and embedding row is what the same
    scales with their mins stored (IQ4's and Q5_1's values as bytes) give."""
    from makers import random_blocks

    from kvrepl.backends.cpu.lanes import lane_scales

    rng = np.random.default_rng(5)
    x = torch.randn(5, 512)
    for qtype, bits, mins in (("Q8_0", 8.5, 0), ("Q6_K", 6.625, 0), ("Q4_0", 4.5, 2),
                              ("Q4_1", 5.0, 1), ("IQ4_NL", 4.5, 0), ("Q5_0", 5.5, 0),
                              ("Q5_1", 6.0, 1)):  # fmt: skip
        n = 40
        p = pack(random_blocks(qtype, n, 512, rng, wide=False), qtype, n, 512)
        il = p.interleaved()
        assert il.mins == mins and il.sc.shape[-1] == (2 if mins == 1 else 1), qtype
        assert il.nbytes() * 8 / (48 * 512) == bits, qtype  # 48: the rows padded to groups of 16
        if mins == 1 and il.fmt == "u4":
            continue  # Q4_1: its mins kept, in the layout it always had
        sub = 32 // p.block
        scales = lane_scales(il.sc, n, sub, False)
        made = scales.float() * -8.0 if mins == 2 else torch.zeros_like(scales)
        sc = lane_scales(torch.cat([scales, made.to(scales.dtype)], -1), n, sub, True)
        dd = None
        if il.dd is not None:
            dd = lane_scales(il.dd, n, 1, False)
            dd = lane_scales(torch.cat([dd, torch.full_like(dd, -0.0)], -1), n, 1, True)
        stored = Packed(il.fmt, il.q, sc, n, 512, p.block, 16, dd=dd, mins=1)
        if il.fmt == "n4" or mins == 1:  # IQ4's indices, Q5_1's 5 bits: against the bytes
            stored = p.interleaved(compact=False)
        assert stored.nbytes() > il.nbytes()
        for k in (kernels, avx2_kernels, scalar_kernels):
            for rows in (1, 2, 5):
                got = matmul(k, x[:rows].contiguous(), il)
                assert torch.equal(got, matmul(k, x[:rows].contiguous(), stored)), (qtype, rows)
            ids = torch.tensor([0, 17, n - 1], dtype=torch.int64)
            got, want = torch.empty(3, 512), torch.empty(3, 512)
            k.rows(desc(il), ids.data_ptr(), 3, got.data_ptr(), 512, 1.0)
            k.rows(desc(stored), ids.data_ptr(), 3, want.data_ptr(), 512, 1.0)
            assert torch.equal(got, want) and torch.equal(got, p.dequantize()[ids]), qtype


def test_parts_join_where_they_share_a_layout(kernels):
    """q, k and v (gate and up) run as one matrix where their layouts agree, each layout chosen
    for its own part: an IQ4_XS file's Q5_K v (llama.cpp's choice where heads share K/V) keeps
    5 bits and q and k their 4-bit indices, not the bytes' layout the three share as a whole."""
    from makers import random_blocks

    from kvrepl.backends.cpu.fastmodel import fuse, join

    rng = np.random.default_rng(9)

    def mk(qtype: str, n: int) -> Packed:
        return pack(random_blocks(qtype, n, 256, rng, wide=False), qtype, n, 256)

    def laid(parts: list[Packed]) -> list:
        return join([(p.interleaved(), col) for p, col in fuse(parts)])

    mixed = laid([mk("IQ4_XS", 64), mk("IQ4_XS", 32), mk("Q5_K", 32)])
    assert [(p.fmt, col) for p, col in mixed] == [("n4", 0), ("n4", 64), ("u5", 96)]
    a, b, c = mk("Q4_1", 64), mk("Q4_1", 32), mk("Q4_1", 20)
    ((j, col),) = laid([a, b, c])
    whole = Packed("u4", torch.cat([a.q, b.q, c.q]), torch.cat([a.sc, b.sc, c.sc]), 116, 256)
    assert col == 0 and j.n == 116 and torch.equal(j.q, whole.interleaved().q)
    assert torch.equal(j.sc, whole.interleaved().sc)
    x = torch.randn(3, 256)
    parts = torch.cat([matmul(kernels, x, p) for p in (a, b, c)], 1)
    assert torch.equal(matmul(kernels, x, j), parts)
    assert len(laid([mk("Q4_1", 20), mk("Q4_1", 32)])) == 2  # 20 rows do not fill their groups


def test_interleaving_rows_changes_no_bit_of_a_result(kernels):
    p = pack(raw_blocks("Q4_1", 64, 256, np.random.default_rng(8)), "Q4_1", 64, 256)
    x = torch.randn(6, 256)
    assert p.interleaved().group == 16
    assert torch.equal(matmul(kernels, x, p), matmul(kernels, x, p.interleaved()))
    assert torch.equal(p.interleaved().canonical().q, p.q)


def every_kind(n: int, k: int, rng: np.random.Generator) -> dict[str, Packed]:
    """Random weights of each kind the kernels have a loop for: u4, i8 per 32 and i8 per 16,
    each with and without mins (the block types map onto these)."""
    out = {}
    for fmt, block in (("u4", 32), ("i8", 32), ("i8", 16)):
        if fmt == "u4":
            q = torch.from_numpy(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
        else:
            q = torch.from_numpy(rng.integers(-128, 128, (n, k), dtype=np.int8))
        sc = torch.from_numpy(rng.uniform(-0.05, 0.05, (n, k // block, 2)).astype(np.float32))
        out[f"{fmt}/{block}+min"] = Packed(fmt, q, sc, n, k, block)
        out[f"{fmt}/{block}"] = Packed(fmt, q, sc * torch.tensor([1.0, 0.0]), n, k, block)
    return out


def test_every_instruction_set_gives_the_same_bits(kernels, avx2_kernels, scalar_kernels):
    """The default build (AVX-512 where the CPU has it), AVX2 and the scalar fallback, on every
    kind of weight and every format, on decode rows (one) and prefill tiles (4 rows and the
    tails), interleaved or not."""
    if kernels.isa == "scalar":
        pytest.skip("this machine has no vector kernels to compare with")
    assert (avx2_kernels.isa, scalar_kernels.isa) == ("avx2", "scalar")
    rng = np.random.default_rng(3)
    weights = []
    for qtype in ALL_TYPES:
        odd = pack(raw_blocks(qtype, 21, 256, rng), qtype, 21, 256)  # the 1-output tails too
        weights += [(qtype, odd), (qtype, pack(raw_blocks(qtype, 20, 256, rng), qtype, 20, 256))]
    for n in (21, 20):
        weights += list(every_kind(n, 256, rng).items())
    for name, p in weights:
        for w in (p, p.interleaved()):
            for rows in (1, 2, 3, 4, 7):  # the decode loops take up to 4
                x = torch.randn(rows, 256)
                want = matmul(scalar_kernels, x, w)
                assert torch.equal(matmul(kernels, x, w), want), (name, w.n, w.group, rows)
                assert torch.equal(matmul(avx2_kernels, x, w), want), (name, w.n, w.group, rows)
    tok = make_tokenizer()
    model = make_family("llama", len(tok))
    ids = torch.randint(0, len(tok), (150,)).tolist()
    runs = []
    for k in (kernels, avx2_kernels, scalar_kernels):
        fast = from_hf(model, "Q4_1", k, 512)
        layers = fast.new_layers()
        runs.append((fast.forward(ids, layers), layers))
    for logits, layers in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(layers, runs[0][1], strict=True))


def attention(k, q, kc, vc, pos0, window, scale):
    m, hd = q.shape
    kvh, cap, d = kc.shape
    heads = hd // d
    out = torch.empty(m, hd)
    n = k.attention_scratch(m, heads, d, pos0 + m)
    scratch = torch.empty(n)
    k.attention(q.data_ptr(), m, hd, heads, kvh, d, kc.data_ptr(), vc.data_ptr(), cap, pos0,
                window, scale, 0.0, out.data_ptr(), hd, scratch.data_ptr(), n)  # fmt: skip
    return out


@pytest.mark.parametrize("window", [0, 100])
def test_attention_matches_float64_and_each_row_is_independent(kernels, window):
    torch.manual_seed(4)
    heads, kvh, d, pos0, m = 6, 2, 32, 300, 40
    kc = torch.randn(kvh, 400, d).half()
    vc = torch.randn(kvh, 400, d).half()
    q = torch.randn(m, heads * d)
    got = attention(kernels, q, kc, vc, pos0, window, 0.2)
    for i in (0, 17, 39):
        pos = pos0 + i
        lo = max(0, pos - window + 1) if window else 0
        for h in range(heads):
            g = h // (heads // kvh)
            s = (q[i, h * d : (h + 1) * d].double() @ kc[g, lo : pos + 1].double().T) * 0.2
            ref = torch.softmax(s, -1) @ vc[g, lo : pos + 1].double()
            assert torch.allclose(got[i, h * d : (h + 1) * d].double(), ref, atol=1e-5)
        alone = attention(kernels, q[i : i + 1].contiguous(), kc, vc, pos, window, 0.2)
        assert torch.equal(alone[0], got[i])


# ---------------------------------------------------------------------------------------------
# the decoder on tiny models of each family


def make_family(family: str, vocab: int, seed: int = 0, *, tied: bool = True):
    """A tiny random model of `family`. Tied, its greedy answer repeats the prompt's last token;
    untied, it varies (what a comparison of answers needs)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied)  # fmt: skip
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=32))
    else:
        cfg = tf.Gemma3TextConfig(
            **dict(common, num_key_value_heads=1), head_dim=32, query_pre_attn_scalar=32,
            sliding_window=16, layer_types=["sliding_attention", "sliding_attention",
                                            "full_attention"])  # fmt: skip
        model = tf.Gemma3ForCausalLM(cfg)
        for name, p in model.named_parameters():  # Gemma's norms start at 0: give them shape
            if "norm" in name:
                p.data.normal_(0, 0.3)
    return model.eval()


def dequantized_copy(model, qtype: str):
    """The transformers model with each linear weight replaced by its quantized value."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.shape[1] % 32 == 0:
                mod.weight.copy_(quantize(mod.weight, qtype).dequantize())
        emb = ref.get_input_embeddings()
        emb.weight.copy_(quantize(emb.weight, qtype).dequantize())
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_decoder_matches_transformers_and_is_chunk_invariant(kernels, family):
    vocab = 384
    model = make_family(family, vocab)
    fast = from_hf(model, "Q8_0", kernels, 512)
    ref = dequantized_copy(model, "Q8_0")
    ids = torch.randint(0, vocab, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0, -1]
    whole = fast.new_layers()
    got = fast.forward(ids, whole)
    assert torch.allclose(got, want, atol=2e-3, rtol=0), (got - want).abs().max()
    pieces = fast.new_layers()  # a prefill chunk, decode steps, another chunk
    fast.forward(ids[:33], pieces)
    for t in ids[33:41]:
        fast.forward([t], pieces)
    assert torch.equal(fast.forward(ids[41:], pieces), got)
    for a, b in zip(whole, pieces, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_reuse_equals_recompute_bit_for_bit_on_a_quantized_tiny_model(kernels):
    tok = make_tokenizer()
    fast = from_hf(make_family("llama", len(tok), seed=3, tied=False), "Q4_1", kernels, 512)
    reuse = Engine(fast, tok, end_ids=set(), context_length=512)
    fresh = Engine(fast, tok, end_ids=set(), context_length=512, reuse=False)
    rng = torch.Generator().manual_seed(7)
    ids: list[int] = []
    for turn in range(4):
        ids = ids + torch.randint(3, len(tok), (20 + 7 * turn,), generator=rng).tolist()
        if turn == 2:
            ids = ids[:25] + ids[40:]  # an edit: the cache is cut in the middle
        a = list(reuse.stream(ids, Sampling(temperature=0, max_tokens=12)))
        b = list(fresh.stream(ids, Sampling(temperature=0, max_tokens=12)))
        assert a[-2] == b[-2]  # the same finish
        assert reuse.progress.generated == fresh.progress.generated
        assert len(set(reuse.progress.generated)) >= 3, reuse.progress.generated  # not a loop
        assert a[-1].reused_tokens > 0 or turn == 0
        ids = ids + reuse.progress.generated
        assert torch.equal(reuse.prefill(ids), fresh.prefill(ids))  # the logits, bit for bit
        assert reuse.progress.reused == len(ids) - 1 and fresh.progress.reused == 0
        for la, lb in zip(reuse.pc.cache.layers, fresh.pc.cache.layers, strict=True):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_a_branch_on_disk_restores_into_the_room_a_longer_turn_left(kernels, tmp_path):
    """/branch back to a branch whose chunks are on disk: they are copied into the buffers the
    turns before left (made under inference mode), and decoding goes on from them exactly."""
    from kvrepl.store.kvstore import KVStore

    tok = make_tokenizer()
    fast = from_hf(make_family("llama", len(tok), seed=4, tied=False), "Q4_1", kernels, 512)
    e = Engine(fast, tok, end_ids=set(), context_length=512)
    fresh = Engine(fast, tok, end_ids=set(), context_length=512, reuse=False)
    rng = torch.Generator().manual_seed(8)
    a = torch.randint(3, len(tok), (40,), generator=rng).tolist()
    list(e.stream(a, Sampling(temperature=0, max_tokens=12)))
    saved, store = list(e.cached_ids), KVStore(tmp_path)
    store.save("s", *e.export(), "fp")
    other = a[:5] + torch.randint(3, len(tok), (400,), generator=rng).tolist()
    list(e.stream(other, Sampling(temperature=0, max_tokens=12)))  # a longer branch
    snapshot = store.load("fp", saved)
    assert snapshot.chunks and e.restore(snapshot) == []
    assert list(e.cached_ids) == saved
    more = saved + [7, 8, 9]
    assert torch.equal(e.prefill(more), fresh.prefill(more))
    assert e.progress.reused == len(saved)
    for la, lb in zip(e.pc.cache.layers, fresh.pc.cache.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    for engine in (e, fresh):  # and the answer goes on as a recomputation's
        list(engine.stream(more + [10], Sampling(temperature=0, max_tokens=12)))
    assert e.progress.generated == fresh.progress.generated
    assert len(set(e.progress.generated)) >= 3, e.progress.generated


# ---------------------------------------------------------------------------------------------
# a GGUF file written here


def write_gguf(path: Path, model, qtype: str) -> None:
    """A tiny Llama as llama.cpp writes it: its names, Q/K rows permuted for its rope, 1-D
    norms in F32, the embedding in Q8_0 (tied)."""
    import gguf
    from gguf.quants import quantize as gguf_quantize

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)

    def add(name: str, t: torch.Tensor, q: str) -> None:
        a = t.detach().float().numpy()
        if q == "F32":
            w.add_tensor(name, a)
        else:
            qt = gguf.GGMLQuantizationType[q]
            w.add_tensor(name, gguf_quantize(a, qt), raw_dtype=qt)

    def llama_cpp_permute(t: torch.Tensor, heads: int) -> torch.Tensor:
        return (
            t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
            .swapaxes(1, 2)
            .reshape(t.shape)
        )

    add("token_embd.weight", model.model.embed_tokens.weight, "Q8_0")
    add("output_norm.weight", model.model.norm.weight, "F32")
    for i, layer in enumerate(model.model.layers):
        at, mlp, b = layer.self_attn, layer.mlp, f"blk.{i}."
        add(
            b + "attn_q.weight", llama_cpp_permute(at.q_proj.weight, cfg.num_attention_heads), qtype
        )
        add(
            b + "attn_k.weight", llama_cpp_permute(at.k_proj.weight, cfg.num_key_value_heads), qtype
        )
        add(b + "attn_v.weight", at.v_proj.weight, qtype)
        add(b + "attn_output.weight", at.o_proj.weight, qtype)
        add(b + "ffn_gate.weight", mlp.gate_proj.weight, qtype)
        add(b + "ffn_up.weight", mlp.up_proj.weight, qtype)
        add(b + "ffn_down.weight", mlp.down_proj.weight, qtype)
        add(b + "attn_norm.weight", layer.input_layernorm.weight, "F32")
        add(b + "ffn_norm.weight", layer.post_attention_layernorm.weight, "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_runs_as_the_same_weights_quantized_in_memory(kernels, tmp_path):
    tok = make_tokenizer()
    model = make_family("llama", len(tok), seed=9)
    write_gguf(tmp_path / "tiny.gguf", model, "Q4_1")
    from_file = from_gguf(tmp_path / "tiny.gguf", model.config, kernels, 512)
    q = from_file.layers[0].qkv[0][0].canonical()
    in_memory = quantize(model.model.layers[0].self_attn.q_proj.weight, "Q4_1")
    assert torch.equal(q.q[: in_memory.n], in_memory.q)  # transformers' Q row order again
    ids = torch.randint(0, len(tok), (60,)).tolist()
    hf = from_hf(model, "Q4_1", kernels, 512)
    hf.embed = hf.lm_head = quantize(model.model.embed_tokens.weight, "Q8_0").interleaved()
    assert torch.equal(
        from_file.forward(ids, from_file.new_layers()), hf.forward(ids, hf.new_layers())
    )


def test_qk_order_undoes_llama_cpps_permutation():
    rows = torch.arange(24.0)
    permuted = rows.reshape(3, 2, 4).swapaxes(1, 2).reshape(-1)  # llama.cpp, 3 heads of 8
    assert torch.equal(permuted[torch.as_tensor(gguf_qk_order(24, 3))], rows)


# ---------------------------------------------------------------------------------------------
# when the fast path cannot run


def test_no_compiler_means_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeError, match="does not run"):
        native.build(tmp_path)


@pytest.mark.model
def test_load_falls_back_to_float32_with_one_line_saying_why(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelError("fast path off: blk.0.attn_q.weight: tensor type Q3_K is not supported")

    monkeypatch.setattr(models, "_fast_gguf", refuse)
    loaded = models.load(progress=False)
    assert loaded.dtype == "float32"
    assert loaded.notes == [
        "fast path off: blk.0.attn_q.weight: tensor type Q3_K is not supported: "
        "running the dequantized float32 model instead"
    ]
    with pytest.raises(ModelError, match="Q3_K"):
        models.load(dtype="gguf", progress=False)


@pytest.mark.model
def test_a_start_where_no_compiler_runs_falls_back_with_one_line(real32, tmp_path):
    """End to end, a real kvrepl process where the C compiler cannot run (`CC` names nothing,
    which native/ tries before any other): it says why in one line, runs the dequantized float32
    model, and answers as that model does."""
    from fault_helpers import reference_answer
    from procs import run_kvrepl

    from kvrepl.store.db import Store

    home, cc = tmp_path / "store", tmp_path / "no-such-cc"
    args = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", "6", "Say hi."]
    done = run_kvrepl(args, home=home, env={"CC": str(cc)}, timeout=300)
    assert done.rc == 0, done.err
    err = done.err.splitlines()
    assert err[0] == (
        f"fast path off: the C compiler {cc} does not run: [Errno 2] No such file or directory: "
        f"'{cc}': running the dequantized float32 model instead"
    ), done.err
    assert len(err) == 2 and err[1].startswith("reused 0 · prefilled "), done.err  # no more
    store = Store(home / "kvrepl.db")
    try:
        session = store.latest_session()
        assert session is not None
        answer = store.active_branch(session.id)[-1]
    finally:
        store.close()
    want = reference_answer(real32, [{"role": "user", "content": "Say hi."}], 6)
    assert list(answer.token_ids or ()) == want and done.out.strip() == answer.content


def test_dtype_gguf_runs_on_the_cpu_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="on the CPU only"):
        models.load(str(tmp_path), dtype="gguf", device="cuda", progress=False)


@pytest.mark.model
def test_the_embedded_model_runs_on_the_fast_path_by_default(real):
    assert real.dtype == "gguf"
    assert real.model.weight_types == "Q4_1+Q8_0"
    assert real.model.k.isa == cpu_isa()  # -march=native picked the best this CPU has
    assert real.model.kv_dtype == torch.float16


def test_a_steps_logits_are_its_own_after_the_next_step(real):
    """A decode step's logits are a copy (numpy's, not torch's clone), not a view of the buffer
    the next forward writes: they keep their values through the next steps."""
    fm = real.model
    layers = fm.new_layers()
    fm.forward(list(range(1000, 1040)), layers)
    first = fm.forward([5], layers)
    kept = first.clone()
    second = fm.forward([6], layers)
    fm.forward([7], layers)
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_a_gguf_files_bytes_leave_resident_memory_once_read(kernels):
    """Each tensor's bytes, once packed, are dropped from the process's resident memory (the
    page cache keeps them): a load no longer holds the whole file on top of the weights it lays
    out. Measured on the file's own mapping (/proc/self/smaps), before and after."""
    import re
    from pathlib import Path

    from kvrepl.backends.cpu.gguf_model import GGUFTensors

    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("no /proc/self/smaps here")
    path = models.embedded_gguf()

    def resident_kb() -> int:
        text, total, inside = smaps.read_text(), 0, False
        for line in text.splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    f = GGUFTensors(path, kernels)
    names = [n for n, (t, dims, _) in f.by_name.items() if len(dims) == 2]
    f.data[:].sum()  # every page resident, as a read of the whole file leaves it
    before = resident_kb()
    for name in names:
        f.packed(name)
    f.finish()  # as the load ends (gguf_model.build)
    after = resident_kb()
    assert before > 0.9 * path.stat().st_size / 1024
    assert after < 0.05 * before  # the header (its tokenizer, 1.7 MB) and the norms stay
