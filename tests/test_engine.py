"""Tests for kvrepl.engine.engine: the prompt cache invariant after every operation, prefix reuse,
chunked prefill, the growing cache layer, the sampler, stop tokens, and greedy equivalence of
reuse against recomputation on the real embedded model: on its fast path bit for bit (logits and
every layer's K/V), in float32 (transformers, not batch-invariant) token for token."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import pytest
import torch
from fault_helpers import make_fault_model
from helpers import fill_cache
from transformers.cache_utils import DynamicLayer

from kvrepl.backends.layers import _GROW_STEP, GrowingLayer
from kvrepl.backends.protocol import KernelBackend
from kvrepl.chat.prompt import Prompt
from kvrepl.engine.cache import PromptCache, hf_layers
from kvrepl.engine.engine import Engine, Sampler, Sampling
from kvrepl.engine.plan import common_prefix
from kvrepl.engine.runners import cache_arg
from kvrepl.errors import PromptError
from kvrepl.events import SHOWN_ONLY, Finish, Plan, Stats, TextDelta

GREEDY = Sampling(temperature=0, max_tokens=12)


# ---------------------------------------------------------------------------------------------
# helpers


def make_engine(tiny, **kwargs) -> Engine:
    model, tok = tiny
    kwargs.setdefault("end_ids", set())
    kwargs.setdefault("context_length", 512)
    return Engine(model, tok, **kwargs)


def text_ids(tiny, text: str) -> list[int]:
    return tiny[1](text, add_special_tokens=False).input_ids


def random_ids(n: int, seed: int, vocab: int = 380) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def reference_kv(model, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V of `ids` computed from nothing in one forward pass."""
    pc = PromptCache(lambda: hf_layers(model.config))
    model(
        input_ids=torch.tensor([list(ids)], device=model.device),
        **{cache_arg(model): pc.cache},
        use_cache=True,
        logits_to_keep=1,
    )
    pc.append(ids)
    pc.check()
    return pc.export()


def assert_consistent(engine: Engine, model=None) -> None:
    """The invariant: every layer holds len(ids) positions; position i holds the K/V of ids[i]."""
    pc = engine.pc
    pc.check()
    if not pc.ids:
        return
    want = reference_kv(model or engine.model, pc.ids)
    for i, ((k, v), (rk, rv)) in enumerate(zip(pc.export(), want, strict=True)):
        assert k.shape == rk.shape, f"layer {i}: {tuple(k.shape)} != {tuple(rk.shape)}"
        assert torch.allclose(k, rk, atol=1e-4), f"layer {i} keys differ from recomputation"
        assert torch.allclose(v, rv, atol=1e-4), f"layer {i} values differ from recomputation"


@torch.inference_mode()
def scratch_logits(tiny, ids: Sequence[int]) -> torch.Tensor:
    return make_engine(tiny, reuse=False).prefill(ids).clone()


def run(engine: Engine, ids: Sequence[int], sampling: Sampling = GREEDY) -> list:
    events = list(engine.stream(ids, sampling))
    engine.pc.check()
    return events


def explode_on(monkeypatch: pytest.MonkeyPatch, module: torch.nn.Module, call_no: int) -> dict:
    """Make `module.forward` raise KeyboardInterrupt on its `call_no`-th call."""
    original = module.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call_no:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


PROMPT_A = "The capital of France is Paris. Hello there, how are you?"


# ---------------------------------------------------------------------------------------------
# prefix cases (tiny model)


def test_empty_cache_prefills_everything(tiny):
    e = make_engine(tiny)
    ids = text_ids(tiny, PROMPT_A)
    logits = e.prefill(ids)
    assert (e.progress.reused, e.progress.prefilled) == (0, len(ids))
    assert e.pc.ids == ids
    assert_consistent(e)
    assert torch.allclose(logits, scratch_logits(tiny, ids), atol=1e-4)


def test_identical_prompt_still_feeds_exactly_one_token(tiny):
    e = make_engine(tiny)
    ids = text_ids(tiny, PROMPT_A)
    first = e.prefill(ids).clone()
    second = e.prefill(ids)
    assert e.progress.prefilled == 1
    assert e.progress.reused == len(ids) - 1
    assert e.pc.ids == ids
    assert_consistent(e)
    assert torch.allclose(first, second, atol=1e-4)


def test_pure_extension_feeds_only_the_new_tokens(tiny):
    e = make_engine(tiny)
    a = text_ids(tiny, PROMPT_A)
    b = a + text_ids(tiny, " user assistant system think caches")
    e.prefill(a)
    logits = e.prefill(b)
    assert (e.progress.reused, e.progress.prefilled) == (len(a), len(b) - len(a))
    assert e.pc.ids == b
    assert_consistent(e)
    assert torch.allclose(logits, scratch_logits(tiny, b), atol=1e-4)


def test_divergence_in_the_middle_reuses_the_common_prefix(tiny):
    e = make_engine(tiny)
    a = random_ids(40, seed=1)
    b = a[:17] + random_ids(30, seed=2)
    assert b[17] != a[17]
    lcp = common_prefix(a, b)
    assert lcp == 17
    e.prefill(a)
    logits = e.prefill(b)
    assert (e.progress.reused, e.progress.prefilled) == (lcp, len(b) - lcp)
    assert e.pc.ids == b
    assert_consistent(e)
    assert torch.allclose(logits, scratch_logits(tiny, b), atol=1e-4)


def test_shorter_prompt_crops_and_feeds_its_last_token(tiny):
    e = make_engine(tiny)
    a = random_ids(40, seed=3)
    short = a[:25]
    e.prefill(a)
    logits = e.prefill(short)
    assert (e.progress.reused, e.progress.prefilled) == (24, 1)
    assert e.pc.ids == short
    assert_consistent(e)
    assert torch.allclose(logits, scratch_logits(tiny, short), atol=1e-4)


def test_align_says_what_a_prefill_will_keep_and_why(tiny):
    e = make_engine(tiny)
    a = random_ids(40, seed=5)
    assert e.align(a) == Plan(0, 40, 0, "empty")
    e.prefill(a)
    assert e.align(a + [7, 8]) == Plan(40, 2, 40, "extend")
    assert e.align(a) == Plan(39, 1, 40, "extend")  # one token is always fed
    assert e.align(a[:10] + [9] * 5) == Plan(10, 5, 40, "cut")
    assert e.cached_tokens == 40 and e.cached_ids == tuple(a)  # align changes nothing
    assert make_engine(tiny, reuse=False).align(a) == Plan(0, 40, 0, "empty")
    e.reuse = False
    assert e.align(a) == Plan(0, 40, 40, "no reuse")


def test_reuse_false_always_recomputes(tiny):
    e = make_engine(tiny, reuse=False)
    ids = random_ids(30, seed=4)
    e.prefill(ids)
    e.prefill(ids)
    assert (e.progress.reused, e.progress.prefilled) == (0, len(ids))
    assert_consistent(e)


def test_incremental_turns_match_scratch_logits_and_greedy_tokens(tiny):
    """A sequence of prompts through one reusing engine: every prefill's logits and the greedy
    continuation equal those of a fresh engine that recomputes everything."""
    e = make_engine(tiny)
    base = random_ids(30, seed=5)
    prompts = [
        base,
        base + random_ids(12, seed=6),  # extension
        base[:20] + random_ids(15, seed=7),  # divergence
        base[:10],  # shorter
        base[:10] + random_ids(5, seed=8),  # extension again after the crop
    ]
    sampling = Sampling(temperature=0, max_tokens=8)
    for ids in prompts:
        before = list(e.pc.ids)
        logits = e.prefill(ids).clone()
        assert e.progress.reused == min(common_prefix(before, ids), len(ids) - 1)
        assert torch.allclose(logits, scratch_logits(tiny, ids), atol=1e-4)
        assert_consistent(e)
        fresh = make_engine(tiny, reuse=False)
        run(e, ids, sampling)
        run(fresh, ids, sampling)
        assert e.progress.generated == fresh.progress.generated
        assert_consistent(e)


def test_empty_prompt_and_context_overflow_raise_prompt_error(tiny):
    e = make_engine(tiny, context_length=20)
    with pytest.raises(PromptError, match="empty"):
        e.prefill([])
    with pytest.raises(PromptError, match="context"):
        e.prefill(random_ids(20, seed=9))
    e.pc.check()


def test_generation_stops_at_the_context_limit(tiny):
    ids = random_ids(10, seed=10)
    e = make_engine(tiny, context_length=14)
    events = run(e, ids, Sampling(temperature=0, max_tokens=50))
    assert events[-2] == Finish("length")
    assert len(e.pc.ids) < 14
    assert len(e.progress.generated) < 50
    assert_consistent(e)


def test_a_sliding_window_model_reuses_a_pure_extension(tiny):
    """Sliding-window layers keep every position: a longer prompt reuses all of the cache."""
    tok = tiny[1]
    model = make_fault_model(tok, sliding_window=4)
    engine = Engine(model, tok, end_ids=set(), context_length=256)
    assert engine.pc.croppable
    first = tok("hello there, how are you?", add_special_tokens=False).input_ids
    engine.prefill(first)
    engine.prefill(first + tok(" fine, thanks", add_special_tokens=False).input_ids)
    assert engine.progress.reused == len(first)
    engine.pc.check()


# ---------------------------------------------------------------------------------------------
# chunked prefill


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16])
def test_chunked_prefill_matches_one_chunk(tiny, chunk_size):
    ids = random_ids(45, seed=11)
    one = make_engine(tiny, chunk_size=1000)
    chunked = make_engine(tiny, chunk_size=chunk_size)
    want = one.prefill(ids).clone()
    got = chunked.prefill(ids)
    assert torch.allclose(got, want, atol=1e-4)
    assert chunked.pc.ids == ids
    for (k, v), (rk, rv) in zip(chunked.pc.export(), one.pc.export(), strict=True):
        assert torch.allclose(k, rk, atol=1e-4) and torch.allclose(v, rv, atol=1e-4)
    # and chunking also applies to the part fed after a reused prefix
    more = ids[:30] + random_ids(20, seed=12)
    got = chunked.prefill(more)
    assert chunked.progress.reused == 30
    assert torch.allclose(got, scratch_logits(tiny, more), atol=1e-4)
    assert_consistent(chunked)


# ---------------------------------------------------------------------------------------------
# the invariant after every operation (tiny model)


def test_invariant_after_stream_to_the_end(tiny):
    e = make_engine(tiny)
    ids = text_ids(tiny, PROMPT_A)
    run(e, ids)
    assert e.pc.ids[: len(ids)] == ids
    fed = e.pc.ids[len(ids) :]
    assert fed == e.progress.generated[: len(fed)]
    assert_consistent(e)


def test_invariant_after_stream_closed_early(tiny):
    e = make_engine(tiny)
    ids = text_ids(tiny, PROMPT_A)
    gen = e.stream(ids, Sampling(temperature=0, max_tokens=30))
    got = [next(gen) for _ in range(4)]
    assert isinstance(got[0], Plan) and all(isinstance(ev, TextDelta) for ev in got[1:])
    gen.close()
    assert e.pc.ids[: len(ids)] == ids
    fed = e.pc.ids[len(ids) :]
    # the last token yielded was sampled but not yet fed
    assert fed == e.progress.generated[: len(fed)]
    assert len(fed) in (len(e.progress.generated) - 1, len(e.progress.generated))
    assert len(e.progress.generated) < 30
    assert_consistent(e)
    # and the next turn reuses what is there and computes the same as from nothing
    more = e.pc.ids + text_ids(tiny, " Hello")
    logits = e.prefill(more)
    assert e.progress.reused == len(more) - len(text_ids(tiny, " Hello"))
    assert torch.allclose(logits, scratch_logits(tiny, more), atol=1e-4)


def test_invariant_after_truncate(tiny):
    e = make_engine(tiny)
    ids = random_ids(40, seed=13)
    e.prefill(ids)
    for n in (35, 35, 20, 1):
        e.pc.keep_first(n)
        assert e.pc.ids == ids[:n]
        assert_consistent(e)
    e.pc.keep_first(100)  # more than there is: nothing changes
    assert e.pc.ids == ids[:1]
    assert_consistent(e)
    e.pc.keep_first(0)
    assert e.pc.ids == [] and set(e.pc.layer_lengths()) <= {0}
    e.pc.check()
    logits = e.prefill(ids)
    assert torch.allclose(logits, scratch_logits(tiny, ids), atol=1e-4)
    assert_consistent(e)


def test_invariant_after_reset(tiny):
    e = make_engine(tiny)
    e.prefill(random_ids(25, seed=14))
    e.pc.reset()
    assert e.pc.ids == [] and set(e.pc.layer_lengths()) <= {0}
    e.pc.check()
    ids = random_ids(12, seed=15)
    e.prefill(ids)
    assert e.progress.reused == 0
    assert_consistent(e)


def test_invariant_after_restore(tiny):
    src = make_engine(tiny)
    ids = random_ids(30, seed=16)
    want = src.prefill(ids).clone()
    snapshot = [(k.clone(), v.clone()) for k, v in src.pc.export()]
    dst = make_engine(tiny)
    dst.prefill(random_ids(7, seed=17))  # restore replaces whatever was there
    fill_cache(dst.pc, ids, snapshot)
    assert dst.pc.ids == ids
    assert_consistent(dst)
    logits = dst.prefill(ids)
    assert (dst.progress.reused, dst.progress.prefilled) == (len(ids) - 1, 1)
    assert torch.allclose(logits, want, atol=1e-4)
    # restoring a part of a snapshot, then growing it by decode
    part = [(k[..., :12, :], v[..., :12, :]) for k, v in snapshot]
    fill_cache(dst.pc, ids[:12], part)
    assert_consistent(dst)
    run(dst, ids)
    assert dst.progress.reused == 12
    assert_consistent(dst)
    fill_cache(dst.pc, [], [])
    assert dst.pc.ids == []
    dst.pc.check()


def test_restore_into_a_cache_that_holds_room_from_an_earlier_turn(tiny, tmp_path):
    """Going back to a branch whose chunks are on disk: they are copied into buffers a longer
    turn left (made under inference mode), not into new ones."""
    from kvrepl.store.kvstore import KVStore

    store, e = KVStore(tmp_path), make_engine(tiny)
    a = random_ids(40, seed=18)
    run(e, a)  # decode grows the buffers past 40 positions
    saved = list(e.cached_ids)
    store.save("s", *e.export(), "fp")
    e.prefill(a[:5] + random_ids(400, seed=19))  # another branch: room for the first
    snapshot = store.load("fp", saved)
    assert snapshot.chunks and e.restore(snapshot) == []
    assert list(e.cached_ids) == saved
    assert_consistent(e)


def test_restore_with_the_wrong_layer_count_leaves_an_empty_consistent_cache(tiny):
    src = make_engine(tiny)
    ids = random_ids(10, seed=18)
    src.prefill(ids)
    dst = make_engine(tiny)
    dst.prefill(ids)
    with pytest.raises(ValueError, match="layers"):
        fill_cache(dst.pc, ids, src.pc.export()[:2])
    assert dst.pc.ids == []
    dst.pc.check()


def test_restore_with_a_bad_later_layer_leaves_a_consistent_cache(tiny):
    src = make_engine(tiny)
    ids = random_ids(10, seed=19)
    src.prefill(ids)
    snap = src.pc.export()
    bad = snap[:-1] + [(snap[-1][0][..., :-1, :], snap[-1][1][..., :-1, :])]
    dst = make_engine(tiny)
    with pytest.raises(ValueError, match="token count"):
        fill_cache(dst.pc, ids, bad)
    dst.pc.check()


@pytest.mark.parametrize("where", ["model", "middle layer"])
def test_invariant_after_interrupt_inside_prefill(tiny, monkeypatch, where):
    model, _ = tiny
    e = make_engine(tiny, chunk_size=4)
    head = random_ids(6, seed=20)
    e.prefill(head)
    ids = head + random_ids(20, seed=21)
    # "model": before any layer of the 2nd chunk; "middle layer": after layer 0 took the 2nd chunk
    module = model if where == "model" else model.model.layers[1]
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        explode_on(mp, module, call_no=2)
        e.prefill(ids)
    assert e.pc.ids == ids[: len(e.pc.ids)], "the cache ids are not a prefix of the prompt"
    assert len(e.pc.ids) == len(head) + 4  # the reused head and the first chunk
    assert_consistent(e)
    logits = e.prefill(ids)
    assert e.progress.reused == len(head) + 4
    assert torch.allclose(logits, scratch_logits(tiny, ids), atol=1e-4)
    assert_consistent(e)


def test_invariant_after_interrupt_during_decode(tiny, monkeypatch):
    model, _ = tiny
    e = make_engine(tiny)
    ids = random_ids(15, seed=22)
    # the prefill is call 1 of layer 1; decode steps are calls 2, 3, 4...
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        explode_on(mp, model.model.layers[1], call_no=4)
        list(e.stream(ids, Sampling(temperature=0, max_tokens=20)))
    assert e.pc.ids[: len(ids)] == ids
    assert e.pc.ids[len(ids) :] == e.progress.generated[:2]
    assert_consistent(e)


# ---------------------------------------------------------------------------------------------
# GrowingLayer


def test_growing_layer_equals_dynamic_layer_through_growth_and_crops():
    g, d = GrowingLayer(), DynamicLayer()
    gen = torch.Generator().manual_seed(0)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)

    def step(n: int) -> None:
        k, v = kv(n)
        gk, gv = g.update(k, v)
        dk, dv = d.update(k, v)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)
        assert g.get_seq_length() == d.get_seq_length()

    step(5)
    capacities, copies, ptr = set(), 0, None
    for _ in range(3 * _GROW_STEP + 40):  # single-token decode steps, past several growths
        step(1)
        assert g._k is not None
        capacities.add(g._k.shape[-2])
        if ptr is not None and g._k.data_ptr() != ptr:
            copies += 1
        ptr = g._k.data_ptr()
    assert len(capacities) >= 3, capacities
    assert copies == len(capacities) - 1, "a decode step copied the cache without growing it"
    assert torch.equal(g.keys, d.keys) and torch.equal(g.values, d.values)

    for remove in (1, 300, 17):
        g.crop(-remove)
        d.crop(-remove)
        assert g.get_seq_length() == d.get_seq_length()
        assert torch.equal(g.keys, d.keys) and torch.equal(g.values, d.values)
        step(1)
        step(33)
    g.crop(0)
    assert torch.equal(g.keys, d.keys)
    with pytest.raises(ValueError):
        g.crop(3)
    g.crop(-g.get_seq_length())
    assert g.get_seq_length() == 0 and g.keys.shape[-2] == 0
    d = DynamicLayer()
    step(4)
    step(1)
    g.reset()
    assert g.get_seq_length() == 0 and not g.is_initialized
    d = DynamicLayer()
    step(3)


# ---------------------------------------------------------------------------------------------
# Sampler (crafted logits)


def _logits(seed: int, n: int = 50) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def sampler(vocab: int = 50, **kwargs) -> Sampler:
    return Sampler(Sampling(**kwargs), vocab, torch.device("cpu"))


def test_temperature_zero_is_argmax():
    s = sampler(temperature=0, top_p=0.5, top_k=3)
    for seed in range(20):
        logits = _logits(seed)
        assert int(s.next_tensor(logits.clone())) == int(torch.argmax(logits))


def test_a_fixed_seed_gives_the_same_tokens_twice():
    def draw(seed: int) -> list[int]:
        s = sampler(temperature=1.0, top_p=1.0, seed=seed)
        return [int(s.next_tensor(_logits(i % 3) * 0.1)) for i in range(60)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert len(set(draw(7))) > 5  # it does sample, not argmax


def test_top_k_one_and_tiny_top_p_are_greedy():
    for kwargs in ({"top_k": 1, "top_p": 1.0}, {"top_k": 0, "top_p": 1e-6}):
        s = sampler(temperature=1.5, **kwargs)
        for seed in range(40):
            logits = _logits(seed) * 0.2  # flat: sampling would wander
            assert int(s.next_tensor(logits.clone())) == int(torch.argmax(logits)), kwargs


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = sampler(vocab=4, temperature=1.0, top_p=0.6, seed=0)
    got = {int(s.next_tensor(logits.clone())) for _ in range(300)}
    assert got == {0, 1}
    s = sampler(vocab=4, temperature=1.0, top_k=3, top_p=1.0, seed=0)
    assert {int(s.next_tensor(logits.clone())) for _ in range(300)} == {0, 1, 2}


def test_repetition_penalty_lowers_a_seen_token():
    # greedy: the seen token loses its lead, for positive and for negative logits
    for logits in (torch.tensor([2.0, 1.8, 0.0]), torch.tensor([-1.0, -1.2, -5.0])):
        plain = sampler(vocab=3, temperature=0)
        plain.seen([0])
        assert int(plain.next_tensor(logits.clone())) == 0
        penal = sampler(vocab=3, temperature=0, repetition_penalty=1.5)
        penal.seen([0])
        assert int(penal.next_tensor(logits.clone())) == 1
    # sampled: the seen token is drawn less often (p 0.25 -> 0.17)
    flat = torch.ones(4)

    def count_zero(penalty: float) -> int:
        s = sampler(vocab=4, temperature=1.0, top_p=1.0, repetition_penalty=penalty, seed=3)
        s.seen([0, 0])
        return sum(int(s.next_tensor(flat.clone())) == 0 for _ in range(3000))

    plain, penalised = count_zero(1.0), count_zero(2.0)
    assert 650 < plain < 850
    assert 400 < penalised < 600
    # unseen tokens are untouched
    s = sampler(vocab=3, temperature=0, repetition_penalty=1.5)
    s.seen([2])
    assert int(s.next_tensor(torch.tensor([2.0, 1.8, 0.0]))) == 0


def test_sampler_does_not_modify_its_input():
    logits = torch.tensor([2.0, 1.8, 0.0])
    s = sampler(vocab=3, temperature=0, repetition_penalty=1.5)
    s.seen([0])
    int(s.next_tensor(logits))
    assert torch.equal(logits, torch.tensor([2.0, 1.8, 0.0]))


def test_fixed_seed_stream_is_reproducible(tiny):
    ids = text_ids(tiny, PROMPT_A)
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=123, max_tokens=15)
    a, b = make_engine(tiny), make_engine(tiny)
    run(a, ids, sampling)
    run(b, ids, sampling)
    assert a.progress.generated == b.progress.generated
    assert len(set(a.progress.generated)) > 1
    run(a, ids, sampling)  # the same engine again, now with a reused cache
    assert a.progress.generated == b.progress.generated
    assert a.progress.reused == len(ids) - 1


# ---------------------------------------------------------------------------------------------
# stop tokens, finish reasons, stats


STATS_FIELDS = ["reused_tokens", "prefilled_tokens", "generated_tokens", "ttft_s", "decode_tok_s"]


def assert_tail(events: list, reason: str) -> Stats:
    assert events[-2] == Finish(reason), events[-3:]
    stats = events[-1]
    assert isinstance(stats, Stats)
    assert [f.name for f in dataclasses.fields(Stats)] == [*STATS_FIELDS, *SHOWN_ONLY]
    assert list(stats.as_dict()) == STATS_FIELDS  # stored; the drafting figures are not
    assert not any(isinstance(ev, (Finish, Stats)) for ev in events[:-2])
    assert stats.ttft_s >= 0 and stats.decode_tok_s >= 0
    return stats


def test_max_tokens_finishes_with_length(tiny):
    e = make_engine(tiny)
    ids = text_ids(tiny, PROMPT_A)
    events = run(e, ids, Sampling(temperature=0, max_tokens=6))
    stats = assert_tail(events, "length")
    assert len(e.progress.generated) == 6
    assert (stats.reused_tokens, stats.prefilled_tokens, stats.generated_tokens) == (0, len(ids), 6)
    assert "".join(ev.text for ev in events if isinstance(ev, TextDelta)) == (
        tiny[1].decode(e.progress.generated, skip_special_tokens=True)
    )
    assert_consistent(e)


def test_end_token_finishes_with_stop_and_is_not_kept(tiny):
    ids = text_ids(tiny, PROMPT_A)
    sampling = Sampling(temperature=1.0, top_p=1.0, seed=5, max_tokens=20)
    free = make_engine(tiny)
    run(free, ids, sampling)
    tokens = free.progress.generated
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    e = make_engine(tiny, end_ids={tokens[k]})
    events = run(e, ids, sampling)
    stats = assert_tail(events, "stop")
    assert e.progress.generated == tokens[:k]
    assert stats.generated_tokens == k
    assert e.pc.ids == ids + tokens[:k]  # the end token is not in the cache
    assert_consistent(e)
    # an end token as the very first token: nothing generated, nothing fed after the prompt
    greedy_first = make_engine(tiny)
    run(greedy_first, ids, Sampling(temperature=0, max_tokens=1))
    e = make_engine(tiny, end_ids={greedy_first.progress.generated[0]})
    events = run(e, ids, GREEDY)
    stats = assert_tail(events, "stop")
    assert stats.generated_tokens == 0 and e.pc.ids == ids
    assert not any(isinstance(ev, TextDelta) for ev in events)


def test_decode_rate_counts_only_the_generated_tokens(tiny, monkeypatch: pytest.MonkeyPatch):
    """A turn that ends on an end token: n tokens over the n-1 intervals between them."""
    model, tok = tiny
    greedy = Sampling(temperature=0, max_tokens=8, repetition_penalty=3.0)
    ids = tok("hello there, how are you?", add_special_tokens=False).input_ids
    probe = Engine(model, tok, end_ids=set(), context_length=512)
    list(probe.stream(ids, greedy))
    first = probe.progress.generated
    stop = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    n = first.index(stop)
    clock = itertools.count()
    monkeypatch.setattr("kvrepl.engine.engine.time.perf_counter", lambda: float(next(clock)))
    engine = Engine(model, tok, end_ids={stop}, context_length=512)
    stats = list(engine.stream(ids, greedy))[-1]
    assert stats.generated_tokens == n
    assert stats.decode_tok_s == 1.0  # one clock tick per sampled token


# ---------------------------------------------------------------------------------------------
# the real embedded model: greedy equivalence of reuse and recomputation


@pytest.fixture
def smol(real_any):
    """The real model in each mode (fast path and float32), its Prompt and end ids."""
    prompt = Prompt(real_any.tokenizer)
    return real_any, prompt, prompt.end_token_ids(real_any.model.generation_config)


def explode_in_layer(mp: pytest.MonkeyPatch, real, layer: int, call_no: int) -> None:
    """KeyboardInterrupt in the real model's `call_no`-th forward: inside decoder layer `layer`
    of a transformers model; at the start of the fast path's forward (one call into the
    kernels, which a signal does not split: its layers move only when it returns)."""
    if not bit_exact(real):
        explode_on(mp, real.model.model.layers[layer], call_no)
        return
    forward, calls = real.model.forward, {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call_no:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    mp.setattr(real.model, "forward", counting)


def real_engine(smol, reuse: bool) -> Engine:
    real, _, ends = smol
    return Engine(
        real.model, real.tokenizer, end_ids=ends, context_length=real.context_length, reuse=reuse
    )


@torch.inference_mode()
def _margin_report(real, ids: list[int], gen_a: list[int], gen_b: list[int]) -> str:
    j = common_prefix(gen_a, gen_b)
    fresh = Engine(real.model, real.tokenizer, end_ids=set(), context_length=real.context_length)
    logits = fresh.prefill(ids + gen_b[:j]).float()
    top = torch.topk(logits, 3)
    tok = real.tokenizer
    ranked = ", ".join(
        f"{tok.convert_ids_to_tokens(int(i))!r}={float(v):.5f}"
        for v, i in zip(top.values, top.indices, strict=True)
    )
    return (
        f"greedy tokens differ at generated position {j}: reuse picked "
        f"{gen_a[j : j + 1]} and recomputation {gen_b[j : j + 1]}; recomputed top logits {ranked}; "
        f"margin {float(top.values[0] - top.values[1]):.6f}"
    )


def _turn(engine: Engine, ids: list[int], max_tokens: int = 40):
    before = list(engine.pc.ids)
    events = list(engine.stream(ids, Sampling(temperature=0, max_tokens=max_tokens)))
    engine.pc.check()
    assert engine.pc.ids[: len(ids)] == ids
    stats = events[-1]
    assert isinstance(stats, Stats) and isinstance(events[-2], Finish)
    assert stats.reused_tokens + stats.prefilled_tokens == len(ids)
    if engine.reuse:
        assert stats.reused_tokens == min(common_prefix(before, ids), len(ids) - 1)
    else:
        assert stats.reused_tokens == 0
    text = "".join(ev.text for ev in events if isinstance(ev, TextDelta))
    return list(engine.progress.generated), text, events[-2].reason, stats


def assert_same_as(got: Engine, want: Engine, exact: bool) -> None:
    """Two caches over the same ids: bit for bit on the fast path (`exact`: its kernels are
    batch-invariant); within float32 rounding on the transformers path, which is not."""
    assert got.pc.ids == want.pc.ids
    for i, ((k, v), (k2, v2)) in enumerate(zip(got.pc.export(), want.pc.export(), strict=True)):
        if exact:
            assert torch.equal(k, k2) and torch.equal(v, v2), f"layer {i}: K/V not bit for bit"
        else:
            assert torch.allclose(k, k2, atol=1e-4) and torch.allclose(v, v2, atol=1e-4), i


def bit_exact(real) -> bool:
    """The model runs on a batch-invariant backend: reuse must equal recomputation bit for bit."""
    return isinstance(real.model, KernelBackend) and real.model.batch_invariant


def _both(smol, reuse: Engine, fresh: Engine, ids: list[int]):
    gen_a, text, reason_a, stats_a = _turn(reuse, ids)
    gen_b, _, reason_b, stats_b = _turn(fresh, ids)
    assert gen_a == gen_b, _margin_report(smol[0], ids, gen_a, gen_b)
    assert reason_a == reason_b
    assert_same_as(reuse, fresh, exact=bit_exact(smol[0]))  # the K/V a recomputation holds
    return text, reason_a, stats_a, stats_b


USER_TURNS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Name one colour of the rainbow.",
    "Say just the word yes.",
    "Thanks! Say goodbye in French 👋.",
]


@pytest.mark.model
# the fast path only: float32's reuse is test_promise's smollm2-float32 case, after every step
@pytest.mark.parametrize("real_any", ["real"], indirect=True)
def test_reuse_is_greedy_equivalent_to_recomputation(smol):
    _, prompt, _ = smol
    reuse, fresh = real_engine(smol, True), real_engine(smol, False)
    messages: list[dict[str, str]] = []
    reasons = []
    for turn, user in enumerate(USER_TURNS):
        messages.append({"role": "user", "content": user})
        ids = prompt.render(messages)
        text, reason, with_reuse, without = _both(smol, reuse, fresh, ids)
        reasons.append(reason)
        assert without.reused_tokens == 0
        if turn > 0:
            assert with_reuse.reused_tokens > 0, f"turn {turn + 1} reused nothing"
            assert with_reuse.prefilled_tokens < len(ids) // 2
        messages.append({"role": "assistant", "content": text})
    assert "stop" in reasons  # the answers exercise both ends of a turn
    assert "length" in reasons

    # /edit of user turn 3: the cache is cut where the rendering differs; then two more turns
    edited = messages[:4] + [{"role": "user", "content": "What is 2 + 2? Answer with the number."}]
    fresh = real_engine(smol, False)
    for follow_up in (None, "And 3 + 3?"):
        if follow_up:
            edited.append({"role": "user", "content": follow_up})
        ids = prompt.render(edited)
        before = list(reuse.pc.ids)
        text, _, with_reuse, without = _both(smol, reuse, fresh, ids)
        assert without.reused_tokens == 0
        assert with_reuse.reused_tokens == common_prefix(before, ids) > 0
        if follow_up is None:
            assert with_reuse.reused_tokens < len(before), "the edit did not crop the cache"
            assert with_reuse.reused_tokens >= len(
                prompt.render(messages[:4], add_generation_prompt=False)
            )
        edited.append({"role": "assistant", "content": text})


@pytest.mark.model
def test_real_model_chunked_restored_and_interrupted_prefill_agree(smol, monkeypatch):
    real, prompt, _ = smol
    ids = prompt.render([{"role": "user", "content": "Name three colours of the rainbow."}])
    whole = real_engine(smol, True)
    want = whole.prefill(ids).clone()
    chunked = real_engine(smol, True)
    chunked.chunk_size = 8
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        explode_in_layer(mp, real, 5, call_no=3)
        chunked.prefill(ids)
    chunked.pc.check()
    assert chunked.pc.ids == ids[:16]
    got = chunked.prefill(ids)
    assert chunked.progress.reused == 16
    same_logits(real, got, want)
    assert_same_as(chunked, whole, exact=bit_exact(real))
    restored = real_engine(smol, True)
    fill_cache(restored.pc, chunked.pc.ids, chunked.pc.export())
    restored.pc.check()
    got = restored.prefill(ids)
    assert (restored.progress.reused, restored.progress.prefilled) == (len(ids) - 1, 1)
    same_logits(real, got, want)
    assert_same_as(restored, whole, exact=bit_exact(real))


def same_logits(real, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit on the fast path; on the transformers path (float32, whose matmuls are not
    batch-invariant) close, with the same greedy token."""
    if bit_exact(real):
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        assert torch.allclose(got, want, atol=1e-3)
        assert int(torch.argmax(got)) == int(torch.argmax(want))


# ---------------------------------------------------------------------------------------------
# transformers' forward across versions


def test_a_forward_that_takes_past_key_values_gets_the_cache_and_one_that_drops_it_is_refused():
    """transformers 5.2x takes the cache as `cache`; 5.17 (the GPU machines here) as
    `past_key_values`, and swallows an unknown `cache` into **kwargs, running without any: each
    step would see its own token alone. The runner passes it by the name the forward takes, and
    a forward that leaves the cache unwritten is refused, never decoded from."""
    from makers import make_tiny_model, make_tokenizer

    from kvrepl.errors import ModelError

    tok = make_tokenizer()
    model = make_tiny_model(len(tok), seed=1, tied=False)
    prompt = list(range(5, 40))
    want_engine = Engine(model, tok, end_ids=set(), context_length=256)
    list(want_engine.stream(prompt, GREEDY))
    want = list(want_engine.progress.generated)
    assert len(set(want)) >= 3, want
    native, name = model.forward, cache_arg(model)

    def old(input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        return native(input_ids=input_ids, **{name: past_key_values}, use_cache=use_cache,
                      logits_to_keep=logits_to_keep)  # fmt: skip

    def dropping(input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kw):
        return native(input_ids=input_ids, use_cache=False, logits_to_keep=logits_to_keep)

    model.forward = old
    engine = Engine(model, tok, end_ids=set(), context_length=256)
    list(engine.stream(prompt, GREEDY))
    assert engine.progress.generated == want
    assert engine.pc.ids == want_engine.pc.ids
    assert engine.pc.cache.layers[0].get_seq_length() == len(want_engine.pc.ids)
    model.forward = dropping
    engine = Engine(model, tok, end_ids=set(), context_length=256)
    with pytest.raises(ModelError, match="without kvrepl's K/V cache"):
        list(engine.stream(prompt, GREEDY))
