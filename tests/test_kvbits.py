"""kv_bits 8: K/V kept as int8 with a float32 scale per position and kv head.

The kernels: a stored row is absmax/127-scaled int8 values and their scale; the attention over
8-bit rows is close to float64 over the dequantized values, each query row's result is the same
computed alone or with others, and the AVX-512, AVX2 and scalar builds give the same bits
(a whole forward's too, in test_native_threads). On the real SmolLM2: a snapshot of 8-bit K/V is
about half the bytes of a 16-bit one; 8-bit and 16-bit K/V never mix (a session resumed with the
other setting says so in one line and recomputes). The refusals: the transformers path, `/set`,
bad values. Reuse equals --no-reuse bit for bit in 8-bit mode: test_promise's smollm2-fast-kv8.
"""

from __future__ import annotations

import pytest
import torch
from helpers import close_conversation, open_conversation
from makers import make_tiny_model, make_tokenizer

from kvrepl.backends.cpu import native
from kvrepl.config import Settings, load_settings, parse_setting
from kvrepl.engine import models
from kvrepl.engine.engine import Engine
from kvrepl.errors import ModelError, UsageError
from kvrepl.store.kvstore import KVStore

GREEDY = Settings(temperature=0.0, repetition_penalty=1.0, max_tokens=4)


# ---------------------------------------------------------------------------------------------
# the kernels


@pytest.fixture(scope="module")
def variants() -> dict[str, native.Kernels]:
    """The default build (AVX-512 here) and the AVX2 and scalar builds."""
    out = {"default": native.kernels(models.cache_dir())}
    for isa in ("avx2", "scalar"):
        out[isa] = native.kernels(models.cache_dir(), native.flags_for(isa))
        assert out[isa].isa == isa
    assert out["default"].isa != "scalar", "this machine has no vector kernels to compare with"
    return out


def store8(k: native.Kernels, keys: torch.Tensor, values: torch.Tensor, cap: int):
    """keys/values [n, kvh, d] stored from position 0 into 8-bit caches [kvh, cap, d + 4]."""
    n, kvh, d = keys.shape
    kc = torch.zeros(kvh, cap, native.kv8_row(d), dtype=torch.int8)
    vc = torch.zeros_like(kc)
    k.store8(keys.contiguous().data_ptr(), values.contiguous().data_ptr(), n, kvh * d, kvh, d,
             kc.data_ptr(), vc.data_ptr(), cap, 0)  # fmt: skip
    return kc, vc


def dequantized(c: torch.Tensor) -> torch.Tensor:
    d = c.shape[-1] - 4
    return c[..., :d].double() * c[..., d:].contiguous().view(torch.float32).double()


def attention8(k: native.Kernels, q: torch.Tensor, kc, vc, pos0: int, window: int, scale: float):
    m, hd = q.shape
    kvh, cap, row = kc.shape
    d = row - 4
    out, n = torch.empty(m, hd), k.attention_scratch(m, hd // d, d, pos0 + m)
    scratch = torch.empty(n)
    k.attention8(q.data_ptr(), m, hd, hd // d, kvh, d, kc.data_ptr(), vc.data_ptr(), cap, pos0,
                 window, scale, 0.0, out.data_ptr(), hd, scratch.data_ptr(), n)  # fmt: skip
    return out


def test_a_stored_row_is_its_absmax_over_127_and_the_nearest_int8s(variants):
    torch.manual_seed(1)
    keys, values = torch.randn(9, 2, 64) * 3, torch.randn(9, 2, 64)
    keys[4, 1] = 0.0  # a row of zeros: scale 0, values 0
    kc, vc = store8(variants["default"], keys, values, 16)
    for x, c in ((keys, kc), (values, vc)):
        scale = c[:, :9, 64:].contiguous().view(torch.float32)[..., 0].T  # [n, kvh]
        amax = x.abs().amax(-1)
        assert torch.equal(scale, amax / 127)
        inv = torch.where(amax > 0, 127 / amax, torch.zeros(()))
        q = c[:, :9, :64].transpose(0, 1).float()
        assert torch.equal(q, torch.round(x * inv[..., None]))  # nearest, ties to even
        assert q.abs().amax() == 127
    assert not kc[1, 4].any()  # the row of zeros, and its scale
    for name, k in variants.items():
        got = store8(k, keys, values, 16)
        assert torch.equal(got[0], kc) and torch.equal(got[1], vc), name


@pytest.mark.parametrize("window", [0, 100])
def test_8bit_attention_is_close_to_float64_row_independent_and_the_same_on_every_isa(
    variants, window
):
    torch.manual_seed(4)
    heads, kvh, d, pos0, m = 6, 2, 32, 300, 40  # keys in two 256-key blocks
    kc, vc = store8(variants["default"], torch.randn(400, kvh, d), torch.randn(400, kvh, d), 400)
    q = torch.randn(m, heads * d)
    got = attention8(variants["default"], q, kc, vc, pos0, window, 0.2)
    for name in ("avx2", "scalar"):
        assert torch.equal(attention8(variants[name], q, kc, vc, pos0, window, 0.2), got), name
    ks, vs = dequantized(kc), dequantized(vc)
    for i in (0, 17, 39):
        pos = pos0 + i
        lo = max(0, pos - window + 1) if window else 0
        for h in range(heads):
            g = h // (heads // kvh)
            s = (q[i, h * d : (h + 1) * d].double() @ ks[g, lo : pos + 1].T) * 0.2
            ref = torch.softmax(s, -1) @ vs[g, lo : pos + 1]
            assert torch.allclose(got[i, h * d : (h + 1) * d].double(), ref, atol=1e-5)
        alone = attention8(variants["default"], q[i : i + 1].contiguous(), kc, vc, pos, window,
                           0.2)  # fmt: skip
        assert torch.equal(alone[0], got[i])


# ---------------------------------------------------------------------------------------------
# the real model: bytes, and 8-bit and 16-bit K/V never mixed


@pytest.mark.model
def test_an_8bit_snapshot_is_about_half_the_bytes(real, real8, tmp_path):
    ids = real.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:120]
    sizes = {}
    for bits, loaded in ((16, real), (8, real8)):
        engine = Engine(loaded.model, loaded.tokenizer, end_ids=set(), context_length=512)
        engine.prefill(ids)
        kv = KVStore(tmp_path / f"kv{bits}")
        report = kv.save("s", *engine.export(), loaded.fingerprint)
        assert report.written_tokens == len(ids)
        sizes[bits] = kv.size_bytes("s")
        assert kv.load_session("s", loaded.fingerprint).layers[0][0].dtype == (
            torch.float16 if bits == 16 else torch.int8
        )
        # and the other kv_bits finds nothing there: its pool is another
        assert kv.load_session("s", loaded.kv_peer).chunks == []
    # 64 values + a 4-byte scale against 64 float16s, per layer, kv head and K or V
    assert 0.50 < sizes[8] / sizes[16] < 0.56, sizes
    assert real.kv_peer == real8.fingerprint and real8.kv_peer == real.fingerprint


def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tok = make_tokenizer()
    make_tiny_model(len(tok), seed=1, tied=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def a_turn(loaded, home, text: str, resume: bool) -> tuple[list[str], int, dict]:
    """One greedy turn of a Conversation in `home` (a new process's: an empty cache), on the
    latest session when `resume`: its notes, the tokens it reused, the cache's figures."""
    chat = open_conversation(loaded, home, GREEDY)
    try:
        if resume:
            chat.sessions.resume_latest()
        turn = chat.send(text)
        turn.run(lambda event: None)
        assert turn.result.stats is not None
        return turn.result.notes, turn.result.stats.reused_tokens, chat.cache_figures()
    finally:
        close_conversation(chat)


def test_a_session_resumed_with_the_other_kv_bits_recomputes_and_says_why(
    tmp_path_factory, tmp_path
):
    folder = tiny_folder(tmp_path_factory)
    by_bits = {bits: models.load(str(folder), device="cpu", progress=False, kv_bits=bits)
               for bits in (16, 8)}  # fmt: skip
    assert by_bits[16].fingerprint != by_bits[8].fingerprint
    home = tmp_path / "home"
    _, _, figures = a_turn(by_bits[16], home, "hello there", resume=False)
    assert figures["weights"].endswith("float16 K/V")
    first = figures["cached_tokens"]
    notes, reused, figures = a_turn(by_bits[8], home, "and again", resume=True)
    assert (
        "snapshot: not used: it holds 16-bit K/V and this run keeps 8-bit (kv_bits 8); "
        "recomputing from the messages" in notes
    ), notes
    assert reused == 0
    assert "8-bit K/V (int8, a scale per position and kv head)" in figures["weights"]
    notes, reused, _ = a_turn(by_bits[8], home, "once more", resume=True)  # its own, from disk
    assert reused > 0 and any("restored" in n for n in notes), notes
    # Back on 16 bits: the session's last snapshot is 8-bit, not used; the 16-bit chunks of its
    # first turn are this run's own kind, and come back (only they)
    notes, reused, _ = a_turn(by_bits[16], home, "back to 16", resume=True)
    assert f"snapshot: restored {first:,} cached tokens from disk" in notes, notes
    assert 0 < reused <= first


# ---------------------------------------------------------------------------------------------
# the setting and its refusals


def test_the_transformers_path_refuses_8bit_kv_in_one_line(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory)
    with pytest.raises(ModelError) as err:
        models.load(str(folder), device="cpu", dtype="float32", progress=False, kv_bits=8)
    line = str(err.value)
    assert line == (
        "kv_bits 8: transformers (--dtype float32 on cpu) keeps its own K/V, so 8-bit K/V "
        "(kvrepl's CPU kernels only) cannot be kept; start without --kv-bits 8 (or "
        "KVREPL_KV_BITS)"
    )


def test_kv_bits_comes_from_the_environment_and_the_flag_and_not_from_set(monkeypatch):
    from kvrepl.app.args import flag_settings, parse

    assert Settings().kv_bits == 16
    monkeypatch.setenv("KVREPL_KV_BITS", "8")
    assert load_settings().kv_bits == 8
    monkeypatch.setenv("KVREPL_KV_BITS", "4")
    with pytest.raises(UsageError, match="^KVREPL_KV_BITS must be one of 16, 8, not 4$"):
        load_settings()
    monkeypatch.delenv("KVREPL_KV_BITS")
    assert load_settings(flag_settings(parse(["--kv-bits", "8"]))).kv_bits == 8
    with pytest.raises(UsageError, match="^kv_bits is chosen when kvrepl starts \\(--kv-bits"):
        parse_setting("kv_bits", "8")


def test_the_memory_check_counts_8bit_rows(monkeypatch):
    from kvrepl.engine import placement

    config = make_tiny_model(300).config  # 3 layers, 2 kv heads of 16: 384 or 240 bytes a token
    monkeypatch.setattr(placement, "available_memory", lambda: 300 * 4096)
    placement.check_memory_fits(config, 4096, kv_bits=8)  # 0.94 of 1.17 MiB free
    with pytest.raises(ModelError, match=r"4,096-token context needs .* use --context 3,072 or"):
        placement.check_memory_fits(config, 4096)  # 1.5 MiB
