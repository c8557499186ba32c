"""Faults, as the user sees them: Ctrl-C during prefill, during generation, while /load warms the
cache and during a save. The interrupted turn is whole (the user's line and an answer marked
interrupted), the cache is true and the snapshot clean, and the next turn equals a
recomputation.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from typing import Any

import pytest
from fault_helpers import (
    assert_cache_true,
    assert_snapshot_clean,
    assert_whole_turns,
    chunk_files,
    make_fault_model,
    make_loaded,
    one_turn_ok,
)
from helpers import Harness, tree

# =============================================================================================
# Interrupts: Ctrl-C during prefill, during generation, during a save


class CtrlCAt:
    """Ctrl-C (KeyboardInterrupt) raised inside the model's forward pass, in decoder layer 1
    (layer 0 has already written its K/V), at the nth forward from now."""

    def __init__(self, model: Any, n: int) -> None:
        self.n, self.calls = n, 0
        self.handle = model.model.layers[1].register_forward_pre_hook(self)

    def __call__(self, module: Any, args: Any) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt

    def __enter__(self) -> CtrlCAt:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def after_interrupt_all_is_consistent(h: Harness, out: str, turns: int) -> None:
    assert "interrupted" in out and "error" not in out, out
    assert_cache_true(h.rt.engine)
    assert_whole_turns(h, turns)  # the interrupted turn is whole: the user's line and an answer
    assert_snapshot_clean(h)
    one_turn_ok(h, "and Germany?")
    assert_snapshot_clean(h)


@pytest.mark.parametrize("when", ["prefill", "generation"])
def test_ctrl_c_in_the_model_leaves_everything_consistent(when, loaded, make):
    h = make(loaded)
    h.line("hello there")
    if when == "prefill":
        h.rt.engine.chunk_size = 8  # a prompt of several forwards: stop after two of them
        n = 3
    else:
        n = 2  # the forward of the first generated token
    with CtrlCAt(h.loaded.model, n) as ctrl_c:
        out = h.line("how are you, and what is the capital of France?")
    assert ctrl_c.calls == n
    answer = h.chat.history()[-1]
    assert answer.role == "assistant" and answer.interrupted
    if when == "prefill":
        assert answer.content == ""
        assert 0 < len(h.rt.engine.pc.ids) < len(h.streams[-1])  # kept the chunks it finished
    h.rt.engine.chunk_size = 512
    after_interrupt_all_is_consistent(h, out, 2)


def test_ctrl_c_inside_the_first_prefill_is_an_interrupt_not_an_internal_error(
    tok, make, monkeypatch: pytest.MonkeyPatch
):
    """Layers the forward pass never reached hold nothing; saving must not trip on them."""
    loaded = make_loaded(make_fault_model(tok), tok)
    h = make(loaded)
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


def test_ctrl_c_while_load_warms_the_cache_leaves_everything_consistent(snap_home, loaded, make,
                                                                        tmp_path):  # fmt: skip
    src, sid = snap_home
    home = tmp_path / "store"
    shutil.copytree(src, home)
    h = make(loaded, home)
    # The part not in the snapshot takes several forwards: it is only the last answer's end
    # (`<|im_end|>`, "\n"), since the answers themselves are cached as they were generated.
    h.rt.engine.chunk_size = 1
    with CtrlCAt(h.loaded.model, 2) as ctrl_c:
        out = h.line("/load snap")
    assert ctrl_c.calls == 2
    assert out.splitlines()[-1] == "interrupted" and "error" not in out, out
    assert h.chat.session.name == "snap"
    assert_cache_true(h.rt.engine)
    assert_whole_turns(h, 3)
    h.rt.engine.chunk_size = 512
    one_turn_ok(h, "and Germany?")
    assert_snapshot_clean(h)


def test_ctrl_c_during_the_save_keeps_the_committed_turn(loaded, make, monkeypatch):
    h = make(loaded)
    h.line("hello there")
    before = chunk_files(h.home, h.sid)
    kv_before = tree(h.home / "kv")

    def ctrl_c(*a, **k):  # the temp file is written and synced; Ctrl-C before the rename
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", ctrl_c)
        out = h.line("how are you")
    assert chunk_files(h.home, h.sid) == before  # the old snapshot, intact
    assert tree(h.home / "kv") == kv_before  # no temp file left, the session's list unchanged
    assert h.chat.history()[-1].role == "assistant"  # committed before the save
    assert "interrupted" in out and "error" not in out, out
    assert_cache_true(h.rt.engine)
    assert_whole_turns(h, 2)
    one_turn_ok(h, "and Germany?")
    assert_snapshot_clean(h)


def test_a_real_sigint_during_the_save_is_held_until_the_save_is_done(loaded, make, monkeypatch):
    h = make(loaded)
    h.line("hello there")
    replace = os.replace
    sent = []

    def sigint_then_replace(*a, **k):
        # the save's own rename, in the main thread: not another thread's cache file (a
        # model's converted weights, say), which would send the Ctrl-C outside the save
        ours = threading.current_thread() is threading.main_thread() and str(h.home) in str(a[1])
        if ours and not sent:
            sent.append(str(a[1]))
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the terminal sends it
        return replace(*a, **k)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever
    try:  # an earlier test left
        with monkeypatch.context() as m:
            m.setattr(os, "replace", sigint_then_replace)
            out = h.line("how are you")
    finally:
        signal.signal(signal.SIGINT, before)
    assert sent and "interrupted" in out and "error" not in out, (sent, out)
    assert_snapshot_clean(h)  # the save finished before the interrupt was delivered
    assert_cache_true(h.rt.engine)
    assert_whole_turns(h, 2)
    one_turn_ok(h, "and Germany?")
