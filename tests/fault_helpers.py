"""Helpers for the fault tests (tests/faults/) and the others that break things: tiny random
models whose greedy answers are varied text, the harness as those tests run it, checks of what
the user is left with (the cache, the snapshot, the history), and ways to break files for real.
Real kvrepl processes, with or without a fault injected, are procs.py's."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from helpers import Harness, make_harness

from kvrepl.config import Settings
from kvrepl.engine import fingerprint as fingerprints
from kvrepl.store.db import Store
from kvrepl.store.kvstore import KVStore

ANSI = "\x1b"
STATS = re.compile(r"^reused [\d,]+ · prefilled [\d,]+ · generated [\d,]+ ", re.M)
# The faults tests/faulty_kvrepl.py injects in a real kvrepl: killed around the second turn's write.
KILLS = ["kill-after-commit:2", "snapshot-then-kill:2", "kill-mid-write:2"]
# Greedy and no repetition penalty (as reference_answer), plain; lines up to 400 columns, so
# that one message is one line.
FAULT_SETTINGS = Settings(temperature=0.0, max_tokens=6, repetition_penalty=1.0, plain=True)
FAULT_WIDTH = 400


# ---------------------------------------------------------------------------------------------
# models


def make_fault_model(tok: Any, seed: int = 0, *, sliding_window: int | None = None,
                     layer_types: list[str] | None = None) -> Any:  # fmt: skip
    """A tiny random model whose greedy answers are varied text (untied embeddings: the tied tiny
    Llama of conftest only ever repeats its last input token). With `sliding_window`, a Qwen2 whose
    `layer_types` hold sliding-window layers."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    if sliding_window is None:
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    cfg = Qwen2Config(**common, use_sliding_window=True, sliding_window=sliding_window,
                      layer_types=layer_types or
                      ["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


def make_loaded(model: Any, tok: Any, *, label: str = "tiny", dtype: str = "float32",
                context_length: int = 256, fingerprint: str | None = None) -> Any:  # fmt: skip
    """A LoadedModel built by hand; the fingerprint is the product's own function of it."""
    from kvrepl.engine import models

    fp = fingerprint or fingerprints.fingerprint(label, model.config, dtype, tok)
    source = models.ModelSource("folder", Path("/nonexistent") / label, label)
    return models.LoadedModel(model, tok, source, "cpu", dtype, fp, context_length)


# ---------------------------------------------------------------------------------------------
# the harness


def fault_harness(home: Path, loaded: Any, *, store: Callable[[Path], Store] = Store,
                  kv: Callable[[Path], KVStore] = KVStore, **settings: Any) -> Harness:  # fmt: skip
    """The harness (helpers.make_harness, `store` and `kv` as there) with FAULT_SETTINGS, and
    `settings` over them."""
    return make_harness(home, loaded, settings=dataclasses.replace(FAULT_SETTINGS, **settings),
                        width=FAULT_WIDTH, store=store, kv=kv)  # fmt: skip


def one_turn_ok(h: Harness, text: str, new_turns: int = 1) -> str:
    """Send a message (or an /edit: new_turns=0); it must be answered (one stats line, no
    error), the cache stay true and the answer equal a recomputation."""
    n = len(h.chat.sessions.user_turns())
    out = h.line(text)
    assert "error:" not in out, out
    assert len(STATS.findall(out)) == 1, out
    assert len(h.chat.sessions.user_turns()) == n + new_turns
    assert_cache_true(h.rt.engine)
    assert_last_answer_is_recompute(h)
    return out


# ---------------------------------------------------------------------------------------------
# what the user is left with


def reference_answer(loaded: Any, messages: list[dict[str, str]] | list[int],
                     max_tokens: int) -> list[int]:  # fmt: skip
    """The greedy answer ids of a fresh engine that reuses nothing (the baseline), for these
    messages or these prompt ids."""
    from kvrepl.chat.prompt import Prompt
    from kvrepl.engine.engine import Engine, Sampling

    prompt = Prompt(loaded.tokenizer)
    ends = prompt.end_token_ids(getattr(loaded.model, "generation_config", None))
    engine = Engine(loaded.model, loaded.tokenizer, end_ids=ends,
                    context_length=loaded.context_length, reuse=False)  # fmt: skip
    ids = messages if messages and isinstance(messages[0], int) else prompt.render(messages)
    # No repetition penalty, as make_harness's settings.
    for _ in engine.stream(ids, Sampling.greedy(max_tokens)):
        pass
    return list(engine.progress.generated)


def assert_last_answer_is_recompute(h: Harness) -> None:
    """The last turn's greedy answer equals a no-reuse recomputation over the stored history."""
    history = h.chat.history()
    assert history and history[-1].role == "assistant"
    msgs = h.chat.prompt_messages(history[:-1])
    want = reference_answer(h.loaded, msgs, h.chat.settings.max_tokens)
    assert list(h.rt.engine.progress.generated) == want


@torch.inference_mode()
def assert_cache_true(engine: Any) -> None:
    """`pc.check()`, and every position holds the K/V a fresh forward pass computes for it."""
    from kvrepl.engine.cache import PromptCache

    pc = engine.pc
    pc.check()
    if not pc.ids:
        return
    fresh = PromptCache(engine.runner.new_layers)
    engine.runner.forward(list(pc.ids), fresh)
    fresh.append(pc.ids)
    for i, ((k, v), (rk, rv)) in enumerate(zip(pc.export(), fresh.export(), strict=True)):
        assert k.shape == rk.shape, f"layer {i}: {tuple(k.shape)} != {tuple(rk.shape)}"
        tol = 1e-4 if k.dtype == torch.float32 else 5e-2
        assert torch.allclose(k, rk, atol=tol) and torch.allclose(v, rv, atol=tol), i


def assert_whole_turns(h: Harness, n_turns: int) -> None:
    """The active branch is n whole turns (user, answer); no half turn, no phantom turn."""
    roles = [m.role for m in h.chat.history()]
    assert roles == ["user", "assistant"] * n_turns, roles


def assert_snapshot_clean(h: Harness) -> None:
    """A fresh KVStore loads the snapshot with no note, and it holds exactly the engine's ids."""
    from kvrepl.store.kvstore import KVStore

    store = KVStore(h.home / "kv")
    result = store.load_session(h.sid, h.loaded.fingerprint)
    assert result.notes == []
    if not h.rt.engine.pc.croppable:  # a cache that cannot be cut is never saved
        assert result.ids == []
        return
    assert result.ids == h.rt.engine.pc.ids
    for d in {p.parent for p in store.session_paths(h.sid)}:
        assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]


def chunk_files(home: Path, sid: str) -> dict[str, bytes]:
    """The session's last snapshot, file name -> bytes."""
    from kvrepl.store.kvstore import KVStore

    return {p.name: p.read_bytes() for p in KVStore(home / "kv").session_paths(sid)}


def db_messages(home: Path) -> list[tuple[str, str, int]]:
    """(role, content, interrupted) of every message, read with plain sqlite3."""
    con = sqlite3.connect(home / "kvrepl.db")
    try:
        return con.execute("SELECT role, content, interrupted FROM messages ORDER BY id").fetchall()
    finally:
        con.close()


def files_outside(root: Path, home: Path) -> set[Path]:
    """Every path under `root` that is not the store `home` or in it."""
    return {p for p in root.rglob("*") if home not in p.parents and p != home}


def fault_lines(out: str) -> list[str]:
    """The lines that say a snapshot was cut or dropped (not the 'restored' line)."""
    return [ln for ln in out.splitlines()
            if ln.startswith("snapshot:") and "restored" not in ln]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# breaking a chunk file


def header(buf: bytes) -> tuple[int, dict[str, Any]]:
    hlen = int.from_bytes(buf[:8], "little")
    return hlen, json.loads(buf[8 : 8 + hlen])


def resave(path: Path, metadata: dict[str, str] | None, dtype: torch.dtype | None = None) -> None:
    """Rewrite a chunk as a well-formed safetensors file with other metadata (and tensors)."""
    from safetensors.torch import load, save

    tensors = load(path.read_bytes())
    if dtype is not None:
        tensors = {k: v if k == "ids" else v.to(dtype) for k, v in tensors.items()}
    path.write_bytes(save(tensors, metadata=metadata))


def forge_dtype(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a chunk with its K/V in another dtype, its metadata and checksums made to match:
    everything in order except that the model computes in another dtype."""
    from safetensors.torch import load, save

    from kvrepl.store.kvstore import crc32s

    buf = path.read_bytes()
    meta = header(buf)[1]["__metadata__"]
    tensors = {k: v if k == "ids" else v.to(dtype) for k, v in load(buf).items()}
    names = ["ids"] + [f"layers.{i}.{kv}" for i in range(int(meta["n_layers"]))
                       for kv in ("keys", "values")]  # fmt: skip
    crcs = crc32s([tensors[k].reshape(-1).view(torch.uint8).numpy() for k in names])
    meta = dict(meta, dtype=str(dtype).removeprefix("torch."),
                data_crc32=",".join(f"{c:08x}" for c in crcs))  # fmt: skip
    path.write_bytes(save(tensors, metadata=meta))
