"""Helpers for the tests of sessions on disk (tests/sessions/): tiny models saved as model folders
(loaded by `models.load`, so their fingerprints are the product's own and a `kvrepl --model
FOLDER` child computes the same), a turn answered and seen whole, the reference a turn that
reuses nothing gives, and checks of the database and the snapshot."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from helpers import close_conversation
from makers import make_tokenizer

from kvrepl.chat.conversation import Conversation
from kvrepl.config import Settings
from kvrepl.engine import models
from kvrepl.engine.models import LoadedModel
from kvrepl.events import Finish, Notice, Stats, TextDelta
from kvrepl.ids import common_prefix
from kvrepl.store.db import STAT_NAMES, Store
from kvrepl.store.kvstore import KVStore
from kvrepl.store.records import Message

# Greedy, with a repetition penalty so that the random tiny model writes text (it repeats "\n"
# otherwise, which the think splitter strips to an empty answer).
TINY = Settings(temperature=0.0, max_tokens=16, repetition_penalty=3.0)
# The tinies are loaded in float32 (transformers, load_folder): a kvrepl child must load them so
# too (a model folder on the CPU otherwise runs on the fast path, another fingerprint).
TINY_FLAGS = ["--temperature", "0", "--max-tokens", "16", "--repetition-penalty", "3",
              "--dtype", "float32"]  # fmt: skip
REAL_FLAGS = ["--temperature", "0", "--max-tokens", "24"]

QUESTIONS = ["What is the capital of France?", "And of Italy?", "And of Spain?"]

HISTORY = [
    ("user", "Hello there, how are you? Tell me about the capital of France."),
    ("assistant", "The capital of France is Paris. Hello there! I am fine, and how are you?"),
    ("user", "What do caches keep? Keys, values and tokens of a prefix?"),
    ("assistant", "A cache keeps the keys and values of every token of the prefix, so the "
                  "model never computes them twice. The user and the assistant share it."),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# tiny models as folders


def save_tiny_model(folder: Path, seed: int) -> Path:
    """A 4-layer random Llama with a 4k context and the test tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@dataclass
class Tinies:
    folder: Path  # .../a/model
    a: LoadedModel
    other: LoadedModel  # another model, another folder name: another fingerprint
    same_name: LoadedModel  # another model (other weights) in a folder also named "model"


def load_folder(folder: Path) -> LoadedModel:
    return models.load(str(folder), device="cpu", dtype="float32", progress=False)


# ---------------------------------------------------------------------------------------------
# Conversation helpers


@dataclass
class Answered:
    """A turn answered, as its events said it (and the engine's cache after it)."""

    answer: str
    notices: list[str]
    stats: Stats
    finish: str
    ids: list[int]  # the engine's cached ids after the turn: prompt + generated


def turn(chat: Conversation, text: str) -> Answered:
    sent = chat.send(text)
    events = list(sent)
    stats, finish = sent.result.stats, sent.result.finish_reason
    assert stats is not None and finish is not None, events
    assert not any(isinstance(e, Stats | Finish) for e in events), events  # the result's alone
    return Answered(
        answer="".join(e.text for e in events if isinstance(e, TextDelta)),
        notices=[e.text for e in events if isinstance(e, Notice)],
        stats=stats,
        finish=finish,
        ids=list(chat.model.get().engine.pc.ids),
    )


def fresh_ids(open_chat: Callable[..., Conversation], loaded: LoadedModel, history: list[Message],
              text: str, home: Path, base: Settings = TINY) -> Answered:  # fmt: skip
    """The same turn on the same messages by a Conversation that reuses nothing (reuse off, no
    snapshot): the reference every restored or cut cache must match token for token."""
    chat = open_chat(loaded, home, base, reuse=False)
    session = chat.sessions.new_session("reference")
    assert session is not None
    for m in history:
        # The messages whole: an answer with the ids it was generated as, as the store has it.
        ids = None if m.token_ids is None else list(m.token_ids)
        chat.store.add_message(session.id, m.role, m.content, think=m.think, token_ids=ids)
    result = turn(chat, text)
    assert result.stats.reused_tokens == 0
    close_conversation(chat)
    return result


def as_prompt(m: Message) -> dict[str, Any]:
    """A stored message as kvrepl renders it: an answer carries the ids it was generated as."""
    return {"role": m.role, "content": m.content, **({"ids": list(m.token_ids)} if m.token_ids
                                                     else {})}  # fmt: skip


def prompt_ids(chat: Conversation, history: list[Message], text: str) -> list[int]:
    """What the prompt of a turn `text` after `history` renders to, by kvrepl's Prompt."""
    msgs = chat.prompt_messages(history) if history else chat.prompt_messages([])
    msgs = [*msgs, {"role": "user", "content": text}]
    return chat.model.get().prompt.render(msgs, enable_thinking=chat.settings.thinking)


def expected_reuse(restored: list[int], prompt: list[int]) -> int:
    """How much of a restored cache a prefill of `prompt` keeps: the common prefix, less one
    token if the prompt is wholly cached (one token is always fed)."""
    return min(common_prefix(restored, prompt), len(prompt) - 1) if restored else 0


def snapshot(home: Path, session_id: str, loaded: LoadedModel):
    """The snapshot as a fresh process loads it (validated)."""
    return KVStore(home / "kv").load_session(session_id, loaded.fingerprint)


def assert_snapshot_is_cache(chat: Conversation) -> None:
    """The session's last snapshot is exactly the engine's cache: ids, and K/V bit for bit;
    what else the pool keeps for it is other branches (at least the cache's tokens in all)."""
    assert chat.session is not None
    pc = chat.model.get().engine.pc
    pc.check()
    assert chat.kv.n_tokens_on_disk(chat.session.id, chat.model.get().loaded.fingerprint) >= len(
        pc.ids
    )
    loaded = snapshot(chat.home, chat.session.id, chat.model.get().loaded)
    assert loaded.notes == []
    assert loaded.ids == pc.ids
    for (k, v), (k2, v2) in zip(loaded.layers, pc.export(), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def no_half_turn(db_path: Path) -> None:
    """The database is intact and every assistant message has its turns row (all five stats)."""
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = conn.execute(
            "SELECT m.id FROM messages m LEFT JOIN turns t ON t.message_id = m.id "
            "WHERE m.role = 'assistant' AND t.message_id IS NULL"
        ).fetchall()
        assert orphans == [], f"assistant messages without a turns row: {orphans}"
        nulls = conn.execute(
            "SELECT message_id FROM turns WHERE "
            + " OR ".join(f"{name} IS NULL" for name in STAT_NAMES)
        ).fetchall()
        assert nulls == [], f"turns rows with a missing stat: {nulls}"
        heads = conn.execute(
            "SELECT s.id FROM sessions s LEFT JOIN messages m ON m.id = s.head_id "
            "WHERE s.head_id IS NOT NULL AND (m.id IS NULL OR m.session_id != s.id)"
        ).fetchall()
        assert heads == [], f"sessions whose head is not one of their messages: {heads}"
    finally:
        conn.close()


def build_session(open_chat: Callable[..., Conversation], loaded: LoadedModel, home: Path,
                  history: list[tuple[str, str]], *, turns: tuple[str, ...] = (),
                  name: str = "demo") -> str:  # fmt: skip
    """A session with `history` written to the store, warmed (snapshot chunk 0 = the history),
    then `turns` answered (one more chunk each). Returns the session id; the Conversation is
    closed."""
    chat = open_chat(loaded, home)
    session = chat.sessions.open_or_create(name)
    for role, text in history:  # answers as a finished turn would store them: with stats
        if role == "assistant":
            chat.store.finish_answer(session.id, text, stats=dict.fromkeys(STAT_NAMES, 0))
        else:
            chat.store.add_message(session.id, role, text)
    if history:
        chat.warm()
    for text in turns:
        turn(chat, text)
    close_conversation(chat)
    return session.id


def session_turns(home: Path, name: str = "demo") -> tuple[str, list[tuple[Message, dict]]]:
    """The session's id and its answers with their stats, read from the database."""
    store = Store(home / "kvrepl.db")
    try:
        session = store.get_session(name)
        assert session is not None, f"no session {name!r} in {home}"
        return session.id, store.turn_stats(session.id)
    finally:
        store.close()
