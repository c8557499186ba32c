"""The GPU path's logic, on the CPU (CI has no GPU): kvrepl/backends/gpu/model.py with its torch
backend over the tiny Llama, untied so that its greedy answers are varied tokens (a tied one repeats
the prompt's last token, and every comparison of answers would pass). The cache has a fixed capacity
whose buffers never move while it fills, is cut back by a length change, saves and restores
through the snapshot store; reuse equals recomputation; the decoder agrees with transformers. The
kernels themselves and the CUDA graph are checked on a GPU (bench/bench_gpu.py --check); a
machine without CUDA imports none of it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from makers import make_tiny_model, make_tokenizer

from kvrepl.backends.gpu.model import GpuModel
from kvrepl.engine.engine import Engine, Sampling
from kvrepl.store.kvstore import KVStore


@pytest.fixture(scope="module")
def varied():
    """(model, tokenizer): the tiny Llama untied, whose greedy answers vary."""
    tok = make_tokenizer()
    return make_tiny_model(len(tok), seed=1, tied=False), tok


@pytest.fixture
def gpu(varied):
    model, tok = varied
    return GpuModel(model, 512, backend="torch"), tok


def test_decoder_agrees_with_transformers(gpu, varied):
    fm, _ = gpu
    model, _ = varied
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
    got = fm.forward(ids, fm.new_layers())
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_the_cache_has_a_fixed_capacity_and_is_cut_by_length(gpu):
    fm, tok = gpu
    engine = Engine(fm, tok, end_ids=set(), context_length=512)
    ptrs = [layer._k.data_ptr() for layer in engine.pc.cache.layers]
    assert {layer._k.shape[2] for layer in engine.pc.cache.layers} == {512}
    ids = list(range(3, 200))
    engine.prefill(ids)
    engine.prefill(ids[:50] + [7, 8, 9])  # cut at 50: a length change
    engine.pc.check()
    engine.pc.keep_first(0)
    engine.prefill(ids[:30])
    assert [layer._k.data_ptr() for layer in engine.pc.cache.layers] == ptrs
    with pytest.raises(ValueError):
        engine.pc.cache.layers[0].room(513)


def test_reuse_equals_recompute_and_the_snapshot_round_trips(gpu, tmp_path):
    fm, tok = gpu
    reuse = Engine(fm, tok, end_ids=set(), context_length=512)
    fresh = Engine(fm, tok, end_ids=set(), context_length=512, reuse=False)
    ids: list[int] = []
    for turn in range(3):
        ids = ids + list(range(10 + turn, 40 + turn))
        a = list(reuse.stream(ids, Sampling(temperature=0, max_tokens=8)))
        list(fresh.stream(ids, Sampling(temperature=0, max_tokens=8)))
        assert reuse.progress.generated == fresh.progress.generated
        assert len(set(reuse.progress.generated)) >= 3, reuse.progress.generated
        assert turn == 0 or a[-1].reused_tokens > 0
        ids = ids + reuse.progress.generated
    store = KVStore(tmp_path)
    store.save("s1", list(reuse.pc.ids), reuse.pc.export(), "fp")
    restored = Engine(fm, tok, end_ids=set(), context_length=512)
    result = store.load("fp", reuse.pc.ids)
    restored.restore(result)
    assert restored.pc.ids == reuse.pc.ids
    for (k, v), (k2, v2) in zip(restored.pc.export(), reuse.pc.export(), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_a_machine_without_cuda_imports_none_of_the_gpu_path():
    code = (
        "import sys, kvrepl.engine.models, kvrepl.engine.engine, kvrepl.chat.conversation\n"
        "import kvrepl.app.cli\n"
        "assert not any(m.startswith(('kvrepl.backends.gpu', 'triton')) for m in sys.modules), "
        "sorted(m for m in sys.modules if 'gpu' in m or 'triton' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _pair(fm, tok, **kw):
    """Two engines over one GPU model: one feeds tokens from the device ahead of the host
    (the GPU path's way), the other samples and feeds them one by one."""
    ahead = Engine(fm, tok, context_length=512, **kw)
    plain = Engine(fm, tok, context_length=512, **kw)
    plain.runner.ahead = False
    assert ahead.runner.ahead
    return ahead, plain


@pytest.mark.parametrize("sampling", [Sampling(temperature=0, max_tokens=12),
                                      Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=3,
                                               max_tokens=12)])  # fmt: skip
def test_decoding_ahead_equals_token_by_token(gpu, sampling):
    fm, tok = gpu
    ids = list(range(5, 60))
    plain_run = Engine(fm, tok, end_ids=set(), context_length=512)
    plain_run.runner.ahead = False
    list(plain_run.stream(ids, sampling))
    want = plain_run.progress.generated
    assert len(set(want)) >= 3, want
    # An end id met mid-answer (the first token from the 4th on not seen before): the step fed
    # ahead is cut again.
    stop = next(t for i, t in enumerate(want) if i >= 3 and t not in want[:i])
    for end_ids in (set(), {stop}):
        ahead, plain = _pair(fm, tok, end_ids=end_ids)
        a = list(ahead.stream(ids, sampling))
        b = list(plain.stream(ids, sampling))
        assert ahead.progress.generated == plain.progress.generated
        assert a[-2] == b[-2]  # the Finish: the same reason
        assert ahead.pc.ids == plain.pc.ids
        ahead.pc.check()
        for (k, v), (k2, v2) in zip(ahead.pc.export(), plain.pc.export(), strict=True):
            assert torch.equal(k, k2) and torch.equal(v, v2)
    assert ahead.progress.generated == want[: want.index(stop)]
    assert len(ahead.progress.generated) >= 3


def test_decoding_ahead_stops_at_the_context_and_when_closed(gpu):
    fm, tok = gpu
    ahead, plain = _pair(fm, tok, end_ids=set())
    ids = [5 + i % 200 for i in range(495)]  # 16 positions of room: ends at the context
    for e in (ahead, plain):
        list(e.stream(ids, Sampling(temperature=0, max_tokens=50)))
        e.pc.check()
    assert ahead.progress.generated == plain.progress.generated
    assert len(set(plain.progress.generated)) >= 3, plain.progress.generated
    assert len(ahead.pc.ids) == len(plain.pc.ids) == 511
    prompt = list(range(5, 40))
    events = ahead.stream(prompt, Sampling(temperature=0, max_tokens=50))
    for _ in range(4):  # the plan, 3 tokens, closed (Ctrl-C): the cache holds its ids, no more
        next(events)
    events.close()
    ahead.pc.check()
    shown = ahead.progress.generated
    fed = ahead.pc.ids[len(prompt) :]
    assert ahead.pc.ids[: len(prompt)] == prompt and fed == shown[: len(fed)]
    assert 2 <= len(fed) <= len(shown) <= len(fed) + 1  # the last token shown may not be fed
    # The next turn goes on from what was fed and answers as token by token does.
    more = prompt + shown + list(range(60, 70))
    for e in (ahead, plain):
        list(e.stream(more, Sampling(temperature=0, max_tokens=12)))
    assert ahead.progress.reused == len(prompt) + len(fed)
    assert ahead.progress.generated == plain.progress.generated


def test_the_layers_views_follow_their_length(gpu):
    """The GPU path's layers make their keys/values views when read (a decode step only moves
    the lengths): after a forward, a cut and a reset, the views are the buffers' filled part."""
    fm, _ = gpu
    layers = fm.new_layers()
    fm.forward(list(range(3, 23)), layers)
    layer = layers[0]
    assert layer.keys.shape[-2] == layer.values.shape[-2] == 20
    assert layer.keys.data_ptr() == layer._k.data_ptr()
    before = layer.keys.clone()
    layer.crop(-5)
    assert torch.equal(layer.keys, before[..., :15, :])
    fm.forward([7, 8], layers)
    assert layer.values.shape[-2] == 17 and layer.get_seq_length() == 17
    layer.reset()
    assert layer.keys is None and layer.values is None


class _Replay:
    """A captured step as a CUDA graph is one: it reads and writes the cache it was captured
    with, whatever cache the replay is asked for."""

    def __init__(self, fm, b, layers, all_logits=False):
        self.run = lambda: fm._run(b, list(layers), all_logits)

    def replay(self):
        self.run()


def test_a_decode_graph_is_never_replayed_over_another_cache(varied, monkeypatch):
    """A cache that shares layer 0's buffer with an earlier one (as a freed cache's address is
    reused) but not its other layers gets its own graph: the replayed step equals the eager one;
    so do the verifications' graphs, one per count of rows."""
    model, _ = varied
    fm = GpuModel(model, 512, backend="torch")
    monkeypatch.setattr(fm, "_capture", lambda *a: _Replay(fm, *a))
    fm.graphs = True
    ids = list(range(3, 40))
    first = fm.new_layers()
    fm.forward(ids, first)
    fm.forward([41], first)  # captured over `first`
    assert fm.warming
    fm.forward([42, 43, 44], first, all_logits=True)  # a verification: captured too
    other = [first[0], *fm.new_layers()[1:]]
    first[0].crop(-first[0].get_seq_length())
    fm.forward(ids, other)
    got = fm.forward([41], other)
    rows = fm.forward([42, 43, 44], other, all_logits=True)
    assert fm.warming  # `other` got a graph of its own
    rows4 = fm.forward([45, 46, 47, 48], other, all_logits=True)  # 4 rows: not the 3 rows' graph
    fm.graphs = False
    eager = fm.new_layers()
    fm.forward(ids, eager)
    want = fm.forward([41], eager)
    assert torch.equal(got, want)
    assert torch.equal(rows, fm.forward([42, 43, 44], eager, all_logits=True))
    assert torch.equal(rows4, fm.forward([45, 46, 47, 48], eager, all_logits=True))
    for x, y in zip(other, eager, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "token by token"])
def test_drafting_on_the_gpu_path_equals_decoding_without(gpu, ahead):
    """The GPU path verifies drafts with every row's logits (forward(all_logits=True)); running
    ahead of the host, it stops doing so while the answer copies, to feed the next token with
    its drafts. On the torch ops (not batch-invariant) drafting is off by default: forced here,
    the logic is what is checked, the bits on a GPU (bench_gpu.py --check)."""
    fm, tok = gpu
    layers = fm.new_layers()
    ids = list(range(5, 45))
    fm.forward(ids[:30], layers)
    rows = fm.forward(ids[30:], layers, all_logits=True)
    assert rows.shape == (10, fm.lm_head.shape[0])
    for i in (0, 4, 9):
        alone = fm.new_layers()
        assert torch.allclose(fm.forward(ids[: 31 + i], alone), rows[i], atol=1e-5)
    assert not Engine(fm, tok, end_ids=set(), context_length=512).runner.drafts
    off = Engine(fm, tok, end_ids=set(), context_length=512)
    prompt = list(range(5, 25)) * 3  # a loop the lookup proposes to continue
    list(off.stream(prompt, Sampling(temperature=0, max_tokens=40, draft=False)))
    want = list(off.progress.generated)
    on = Engine(fm, tok, end_ids=set(), context_length=512)
    on.runner.drafts, on.runner.ahead = True, ahead
    on.draft_policy.pin(rate=0.95, cost=0.0)  # eager: draft on any match
    fed_ahead = []
    real = on.runner.forward_token
    on.runner.forward_token = lambda *a: fed_ahead.append(1) or real(*a)
    list(on.stream(prompt, Sampling(temperature=0, max_tokens=40)))
    assert on.progress.generated == want
    assert on.progress.drafted > on.progress.accepted > 0, on.progress
    assert (len(fed_ahead) > 0) == ahead, len(fed_ahead)  # ahead where no copy was under way
    on.pc.check()
    assert on.pc.ids == off.pc.ids
