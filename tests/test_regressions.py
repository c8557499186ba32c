"""Defects found by reading the code after the suites were written, each pinned by a test."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from fault_helpers import fault_harness, make_fault_model, make_loaded

from kvrepl.engine import Engine, Sampling
from kvrepl.errors import KvreplError
from kvrepl.handle import ModelHandle


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


def test_a_sliding_window_model_reuses_a_pure_extension(tok):
    """Sliding-window layers keep every position: a longer prompt reuses all of the cache."""
    model = make_fault_model(tok, sliding_window=4)
    engine = Engine(model, tok, end_ids=set(), context_length=256)
    assert engine.pc.croppable
    first = tok("hello there, how are you?", add_special_tokens=False).input_ids
    engine.prefill(first)
    engine.prefill(first + tok(" fine, thanks", add_special_tokens=False).input_ids)
    assert engine.progress.reused == len(first)
    engine.pc.check()


def test_ctrl_c_inside_the_first_prefill_is_an_interrupt_not_an_internal_error(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Layers the forward pass never reached hold nothing; saving must not trip on them."""
    loaded = make_loaded(make_fault_model(tok), tok)
    h = fault_harness(tmp_path / "store", loaded)
    try:
        layer = loaded.model.model.layers[1]
        original = layer.forward

        def explode(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(layer, "forward", explode)
        out = h.line("hello there")
        monkeypatch.setattr(layer, "forward", original)
        assert "internal error" not in out, out
        assert "interrupted" in out, out
        assert [m.role for m in h.chat.history()] == ["user", "assistant"]
        assert h.chat.history()[-1].interrupted
        h.rt.engine.pc.check()
        assert "internal error" not in h.line("and now?")
    finally:
        h.close()


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
    monkeypatch.setattr("kvrepl.engine.time.perf_counter", lambda: float(next(clock)))
    engine = Engine(model, tok, end_ids={stop}, context_length=512)
    stats = list(engine.stream(ids, greedy))[-1]
    assert stats.generated_tokens == n
    assert stats.decode_tok_s == 1.0  # one clock tick per sampled token


def test_retry_moves_nothing_when_the_model_cannot_answer(tok, tmp_path: Path):
    loaded = make_loaded(make_fault_model(tok), tok)
    h = fault_harness(tmp_path / "store", loaded)
    try:
        h.line("hello there")
        before = [m.id for m in h.chat.history()]

        def no_model():
            raise KvreplError("the model failed to load: gone")

        h.chat.model = ModelHandle(h.chat.settings, load=no_model)
        out = h.line("/retry")
        assert out.startswith("error: the model failed to load"), out
        assert [m.id for m in h.chat.history()] == before
    finally:
        h.close()


def test_branch_without_a_session_creates_none(tok, tmp_path: Path):
    loaded = make_loaded(make_fault_model(tok), tok)
    h = fault_harness(tmp_path / "store", loaded)
    try:
        out = h.line("/branch 3")
        assert out.startswith("error: no branches yet"), out
        assert h.chat.session is None
        assert h.chat.store.list_sessions() == []
    finally:
        h.close()
