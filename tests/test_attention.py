"""`sdpa_gqa` (kvrepl/backends/hf/attention.py) gives what transformers' own SDPA path gives: same
logits for a decode step, for a prefill chunk after cached tokens, and for a first prefill."""

from __future__ import annotations

import copy

import torch

from kvrepl.backends.hf.attention import use_sdpa_gqa
from kvrepl.engine.engine import Engine, Sampling


def _engines(tiny):
    model, tok = tiny
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    fast = copy.deepcopy(model)
    fast.set_attn_implementation("sdpa")
    assert use_sdpa_gqa(fast)
    make = lambda m: Engine(m, tok, end_ids=set(), context_length=512, chunk_size=7)  # noqa: E731
    return make(plain), make(fast)


def test_same_logits_for_prefill_cached_prefill_and_decode(tiny):
    plain, fast = _engines(tiny)
    ids = list(range(3, 40))
    for n in (20, 37):  # a first prefill (in chunks, masked), then a cached one
        a, b = plain.prefill(ids[:n]), fast.prefill(ids[:n])
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    greedy = Sampling(temperature=0, max_tokens=12, repetition_penalty=3.0)
    list(plain.stream(ids + [5, 6], greedy))
    list(fast.stream(ids + [5, 6], greedy))
    assert plain.progress.generated == fast.progress.generated
    fast.pc.check()


def test_a_model_without_grouped_heads_keeps_its_attention(tiny):
    model, _ = tiny
    m = copy.deepcopy(model)
    m.config.num_key_value_heads = m.config.num_attention_heads
    m.set_attn_implementation("sdpa")
    assert not use_sdpa_gqa(m)
    assert m.config._attn_implementation == "sdpa"
