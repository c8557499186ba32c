"""Sessions on disk (issue 3): a conversation and its KV cache survive the process.

1. Round trip across processes on the real model (`python -m kvrepl` with piped stdin): a resumed
   session prefills only the new turn, says what it restored, and answers exactly as one
   uninterrupted process does.
2. Every kind of invalid snapshot, made on the real files a `Conversation` wrote: a notice, a
   correct recompute (greedy tokens equal a run that reuses nothing), the cache invariant, and a
   healed snapshot afterwards.
3. kill -9 in the middle of saving, at chosen points (the child kills itself) and at random
   moments (the test kills `kvrepl`): the store opens, no half turn, `kvrepl --resume` works and
   its first turn is consistent.
4. Autosave: after each answer the database holds the turn and the snapshot holds the cache.

The tiny models here are saved as model folders and loaded by `models.load`, so their
fingerprints are the product's own and a `kvrepl --model FOLDER` child computes the same.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import close_conversation, open_conversation
from makers import make_tokenizer
from procs import PYTHON, TESTS, Done, Kvrepl, kvrepl_env, run_kvrepl, stats_of

from kvrepl import models
from kvrepl.chat import Conversation
from kvrepl.config import Settings
from kvrepl.engine import common_prefix
from kvrepl.events import Finish, Notice, Stats, TextDelta
from kvrepl.handle import Runtime
from kvrepl.kvbook import Ref
from kvrepl.kvstore import KVStore
from kvrepl.models import LoadedModel
from kvrepl.store import STAT_NAMES, Message, Store

# Greedy, with a repetition penalty so that the random tiny model writes text (it repeats "\n"
# otherwise, which the think splitter strips to an empty answer).
TINY = Settings(temperature=0.0, max_tokens=16, repetition_penalty=3.0)
TINY_FLAGS = ["--temperature", "0", "--max-tokens", "16", "--repetition-penalty", "3"]
REAL_FLAGS = ["--temperature", "0", "--max-tokens", "24"]

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


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> Tinies:
    base = tmp_path_factory.mktemp("tiny-models")
    a = save_tiny_model(base / "a" / "model", seed=0)
    other = save_tiny_model(base / "other", seed=1)
    same = save_tiny_model(base / "b" / "model", seed=2)
    return Tinies(a, load_folder(a), load_folder(other), load_folder(same))


# ---------------------------------------------------------------------------------------------
# Conversation helpers


@pytest.fixture
def chats() -> Iterator[Callable[..., Conversation]]:
    """open_chat(loaded, home, base=TINY, **settings): a Conversation with its own engine (a
    fresh process, as far as the cache goes) over `home`; all are closed at the end."""
    opened: list[Conversation] = []

    def open_chat(loaded: LoadedModel, home: Path, base: Settings = TINY,
                  **over: Any) -> Conversation:  # fmt: skip
        chat = open_conversation(loaded, home, replace(base, **over))
        opened.append(chat)
        return chat

    yield open_chat
    for chat in opened:
        close_conversation(chat)


@dataclass
class Turn:
    answer: str
    notices: list[str]
    stats: Stats
    finish: str
    ids: list[int]  # the engine's cached ids after the turn: prompt + generated


def turn(chat: Conversation, text: str) -> Turn:
    events = list(chat.send(text))
    stats = [e for e in events if isinstance(e, Stats)]
    finish = [e.reason for e in events if isinstance(e, Finish)]
    assert len(stats) == 1 and len(finish) == 1, events
    return Turn(
        answer="".join(e.text for e in events if isinstance(e, TextDelta)),
        notices=[e.text for e in events if isinstance(e, Notice)],
        stats=stats[0],
        finish=finish[0],
        ids=list(chat.model.get().engine.pc.ids),
    )


def fresh_ids(open_chat: Callable[..., Conversation], loaded: LoadedModel, history: list[Message],
              text: str, home: Path, base: Settings = TINY) -> Turn:  # fmt: skip
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
    store = Store(home / "kvrepl.db")
    try:
        session = store.get_session(name)
        assert session is not None, f"no session {name!r} in {home}"
        return session.id, store.turn_stats(session.id)
    finally:
        store.close()


# =============================================================================================
# 1. round trip across processes, real model

QUESTIONS = ["What is the capital of France?", "And of Italy?", "And of Spain?"]


@dataclass
class RealRuns:
    a: Done  # --session demo, turns 1-2, then EOF
    resumed: dict[str, Done]  # "--resume" / "--session": turn 3 in a copy of a's store
    whole: Done  # one process, turns 1-3
    homes: dict[str, Path]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    base = tmp_path_factory.mktemp("real-runs")
    homes = {k: base / k / "store" for k in ("a", "resume", "session", "whole")}
    for home in homes.values():
        home.parent.mkdir(parents=True)
    # Two at a time: the machine has two cores and each child runs one thread.
    pa = Kvrepl(["--session", "demo", *REAL_FLAGS], home=homes["a"],
                stdin="\n".join(QUESTIONS[:2]) + "\n")  # fmt: skip
    pw = Kvrepl(["--session", "demo", *REAL_FLAGS], home=homes["whole"],
                stdin="\n".join(QUESTIONS) + "\n")  # fmt: skip
    a, whole = pa.finish(240), pw.finish(240)
    for k in ("resume", "session"):
        shutil.copytree(homes["a"], homes[k])
    pr = Kvrepl(["--resume", *REAL_FLAGS], home=homes["resume"], stdin=QUESTIONS[2] + "\n")
    ps = Kvrepl(["--session", "demo", *REAL_FLAGS], home=homes["session"],
                stdin=QUESTIONS[2] + "\n")  # fmt: skip
    resumed = {"resume": pr.finish(240), "session": ps.finish(240)}
    for name, run in [("a", a), ("whole", whole), *resumed.items()]:
        assert run.rc == 0, f"{name}: rc {run.rc}\n{run.out}\n{run.err}"
    return RealRuns(a, resumed, whole, homes)


@pytest.mark.model
@pytest.mark.parametrize("how", ["resume", "session"])
def test_resumed_process_prefills_only_the_new_turn(real_runs: RealRuns, real, how: str):
    from kvrepl.prompt import Prompt

    sid, a_turns = session_turns(real_runs.homes["a"])
    on_disk = snapshot(real_runs.homes["a"], sid, real)  # what process A left behind
    assert on_disk.notes == [] and on_disk.ids
    _, turns = session_turns(real_runs.homes[how])
    _, whole = session_turns(real_runs.homes["whole"])
    assert len(a_turns) == 2 and len(turns) == 3 and len(whole) == 3

    # The prompt of turn 3, rendered from the stored conversation by kvrepl's Prompt.
    msgs = []
    for m, _ in turns[:2]:
        msgs.append({"role": "user", "content": QUESTIONS[len(msgs) // 2]})
        msgs.append({"role": "assistant", "content": m.content})
    msgs.append({"role": "user", "content": QUESTIONS[2]})
    prompt = Prompt(real.tokenizer)
    ids3 = prompt.render(msgs)
    reused = expected_reuse(on_disk.ids, ids3)
    # The whole snapshot agrees with the new prompt, and what is left is only turn 3's text.
    assert reused == len(on_disk.ids) > 0
    tail = real.tokenizer.decode(ids3[reused:])
    turn3 = f"<|im_end|>\n<|im_start|>user\n{QUESTIONS[2]}<|im_end|>\n<|im_start|>assistant\n"
    assert tail == turn3

    stats = turns[2][1]
    assert stats["reused_tokens"] == reused
    assert stats["prefilled_tokens"] == len(ids3) - reused
    # ... which is what the uninterrupted process prefilled for its turn 3.
    assert stats["prefilled_tokens"] == whole[2][1]["prefilled_tokens"]
    assert stats["reused_tokens"] == whole[2][1]["reused_tokens"]

    run = real_runs.resumed[how]
    assert f"snapshot: restored {len(on_disk.ids):,} cached tokens" in run.err
    assert "session demo: 2 turn(s)" in run.err
    lines = run.stats()
    assert lines == [(reused, len(ids3) - reused, stats["generated_tokens"])]


@pytest.mark.model
@pytest.mark.parametrize("how", ["resume", "session"])
def test_resumed_answers_equal_one_uninterrupted_process(real_runs: RealRuns, how: str):
    _, turns = session_turns(real_runs.homes[how])
    _, whole = session_turns(real_runs.homes["whole"])
    answers = [m.content for m, _ in turns]
    assert answers == [m.content for m, _ in whole]
    assert all(answers) and answers[0] != answers[1] != answers[2]
    # The generated counts agree too (the text could hide a difference in tokens).
    assert [s["generated_tokens"] for _, s in turns] == [s["generated_tokens"] for _, s in whole]


@pytest.mark.model
def test_quitting_at_eof_loses_nothing(real_runs: RealRuns, real):
    """Process A read two lines and met the end of input: both turns are stored with their stats,
    and the snapshot holds the cache as it was after the last answer."""
    home = real_runs.homes["a"]
    sid, turns = session_turns(home)
    assert [m.role for m, _ in turns] == ["assistant", "assistant"]
    assert all(set(s) == set(STAT_NAMES) and None not in s.values() for _, s in turns)
    assert real_runs.a.stats() == [
        (s["reused_tokens"], s["prefilled_tokens"], s["generated_tokens"]) for _, s in turns
    ]
    last = turns[-1][1]
    cached = last["reused_tokens"] + last["prefilled_tokens"] + last["generated_tokens"]
    assert KVStore(home / "kv").n_tokens_on_disk(sid) == cached
    loaded = snapshot(home, sid, real)
    assert loaded.notes == [] and len(loaded.ids) == cached
    no_half_turn(home / "kvrepl.db")


# =============================================================================================
# 2. invalid snapshots, through Chat


def chunks(home: Path, sid: str) -> list[Path]:
    return KVStore(home / "kv").session_paths(sid)


def truncate_last_chunk(home: Path, sid: str) -> None:
    last = chunks(home, sid)[-1]
    os.truncate(last, last.stat().st_size - 1000)


def flip_byte_in_first_chunk(home: Path, sid: str) -> None:
    first = chunks(home, sid)[0]
    data = bytearray(first.read_bytes())
    data[-7] ^= 0x40  # in the last layer's values
    first.write_bytes(bytes(data))


def remove_first_chunk(home: Path, sid: str) -> None:
    chunks(home, sid)[0].unlink()


def empty_folder(home: Path, sid: str) -> None:
    for path in chunks(home, sid):
        path.unlink()


def remove_folder(home: Path, sid: str) -> None:
    shutil.rmtree(home / "kv" / "chunks")


def edit_first_message_behind_its_back(home: Path, sid: str) -> None:
    conn = sqlite3.connect(home / "kvrepl.db")
    with conn:
        (mid,) = conn.execute(
            "SELECT id FROM messages WHERE session_id = ? ORDER BY id LIMIT 1", [sid]
        ).fetchone()
        conn.execute(
            "UPDATE messages SET content = replace(content, 'capital of France', "
            "'capital of Italy') WHERE id = ?",
            [mid],
        )
        assert conn.total_changes == 1
    conn.close()


NO_SNAPSHOT = r"snapshot: none on disk for this session; recomputing from the messages"
# (corruption, model that reopens, the snapshot notice, tokens restored: "all", "first", 0)
CASES = {
    "truncated-last-chunk": (truncate_last_chunk, "a",
                             r"snapshot: kept ([\d,]+) of ([\d,]+) tokens: chunk at \1 is "
                             r"truncated", "first"),
    "flipped-byte": (flip_byte_in_first_chunk, "a",
                     r"snapshot: dropped: it is corrupted \(data checksum mismatch\)", 0),
    "another-model": (None, "other", r"snapshot: dropped: it was made by another model", 0),
    "first-chunk-missing": (remove_first_chunk, "a",
                            r"snapshot: dropped: its first chunk is missing", 0),
    "messages-edited": (edit_first_message_behind_its_back, "a", None, "all"),
    "empty-folder": (empty_folder, "a", NO_SNAPSHOT, 0),
    "no-folder": (remove_folder, "a", NO_SNAPSHOT, 0),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_snapshot_is_cut_or_dropped_and_recomputed(case, tinies, chats, tmp_path):
    corrupt, model, note, restored_part = CASES[case]
    loaded = getattr(tinies, model)
    home = tmp_path / "store"
    sid = build_session(chats, tinies.a, home, HISTORY, turns=("Tell me about keys.",))
    before = snapshot(home, sid, tinies.a)
    assert before.notes == [] and len(chunks(home, sid)) == 2
    first_end = Ref.parse(chunks(home, sid)[1].name).start
    if corrupt is not None:
        corrupt(home, sid)

    chat = chats(loaded, home)
    chat.sessions.open("demo")
    history = chat.history()
    text = "And what about values?"
    prompt = prompt_ids(chat, history, text)
    result = turn(chat, text)

    # One line: what happened to the snapshot and why (it names what was kept), or, when it
    # was whole, what was restored.
    restored = {"all": before.ids, "first": before.ids[:first_end], 0: []}[restored_part]
    snap_notes = [n for n in result.notices if n.startswith("snapshot:")]
    restored_line = f"snapshot: restored {len(restored):,} cached tokens from disk"
    why = [n for n in snap_notes if n != restored_line]
    if note is not None:
        assert len(why) == 1 and re.fullmatch(note, why[0]), result.notices
    assert (restored_line in snap_notes) == bool(restored and not why), result.notices
    assert len(snap_notes) == 1, result.notices

    # The turn reused exactly the part of the snapshot that still agrees with the messages.
    reused = expected_reuse(restored, prompt)
    assert result.stats.reused_tokens == reused
    assert result.stats.prefilled_tokens == len(prompt) - reused
    assert result.ids[: len(prompt)] == prompt
    if case == "messages-edited":
        # The cut lands at the first changed token of the edited first message.
        old = chat.model.get().prompt.render([{"role": "user", "content": HISTORY[0][1]}])
        new = chat.model.get().prompt.render([{"role": "user", "content": history[0].content}])
        assert 0 < reused == common_prefix(old, new) < len(before.ids)
        assert f"cache: cut at token {reused:,} (turn 1, user); recomputing " \
               f"{len(prompt) - reused:,} tokens" in result.notices  # fmt: skip
    chat.model.get().engine.pc.check()

    # The answer is token for token the one of a run that reuses nothing.
    ref = fresh_ids(chats, loaded, history, text, tmp_path / "ref")
    assert result.ids == ref.ids
    assert result.answer == ref.answer

    # And the snapshot is whole again: exactly the cache.
    assert_snapshot_is_cache(chat)


@pytest.mark.parametrize("case", ["empty-folder", "no-folder"])
def test_a_missing_snapshot_is_reported(case, tinies, chats, tmp_path):
    """A session with messages and no snapshot says so (it was recomputed in silence before
    d0c7344)."""
    home = tmp_path / "store"
    sid = build_session(chats, tinies.a, home, HISTORY)
    CASES[case][0](home, sid)
    chat = chats(tinies.a, home)
    chat.sessions.open("demo")
    result = turn(chat, "And what about values?")
    assert result.stats.reused_tokens == 0
    assert result.notices == [NO_SNAPSHOT]


def test_a_snapshot_of_other_weights_in_a_same_named_folder_is_refused(tinies, chats, tmp_path):
    """Two models with the same folder name, config and vocabulary but other weights: the
    fingerprint tells them apart (before d0c7344 it hashed the folder's name, not the weights,
    and the K/V of the first were reused by the second in silence)."""
    home = tmp_path / "store"
    build_session(chats, tinies.a, home, HISTORY, turns=("Tell me about keys.",))
    chat = chats(tinies.same_name, home)  # .../b/model: same name, same config, other weights
    chat.sessions.open("demo")
    history = chat.history()
    result = turn(chat, "And what about values?")
    ref = fresh_ids(chats, tinies.same_name, history, "And what about values?", tmp_path / "ref")
    assert result.notices == ["snapshot: dropped: it was made by another model"]
    assert result.ids == ref.ids


@pytest.mark.model
def test_real_model_messages_edited_behind_its_back_cut_at_the_first_changed_token(
    real, chats, tmp_path
):
    """On the real model: a stored answer changed in the database after the snapshot was saved.
    The snapshot is restored whole (it is valid), the cache is cut at the first changed token
    and the answer is the one a full recompute gives."""
    greedy = Settings(temperature=0.0, max_tokens=12)
    home = tmp_path / "store"
    chat = chats(real, home, greedy)
    session = chat.sessions.open_or_create("demo")
    first = turn(chat, QUESTIONS[0])
    turn(chat, QUESTIONS[1])
    close_conversation(chat)
    before = snapshot(home, session.id, real)
    conn = sqlite3.connect(home / "kvrepl.db")
    with conn:
        n = conn.execute(
            "UPDATE messages SET content = ? WHERE session_id = ? AND role = 'assistant' "
            "AND content = ?", ["Paris is the capital of France.", session.id, first.answer]
        ).rowcount  # fmt: skip
        assert n == 1
    conn.close()

    chat = chats(real, home, greedy)
    chat.sessions.open("demo")
    history = chat.history()
    prompt = prompt_ids(chat, history, QUESTIONS[2])
    result = turn(chat, QUESTIONS[2])
    cut = common_prefix(before.ids, prompt)
    assert 0 < cut < len(before.ids)
    assert result.notices[0] == f"snapshot: restored {len(before.ids):,} cached tokens from disk"
    assert result.notices[1].startswith(f"cache: cut at token {cut:,} (turn 1, assistant)")
    assert (result.stats.reused_tokens, result.stats.prefilled_tokens) == (cut, len(prompt) - cut)
    chat.model.get().engine.pc.check()
    ref = fresh_ids(chats, real, history, QUESTIONS[2], tmp_path / "ref", greedy)
    assert result.ids == ref.ids and result.answer == ref.answer
    assert_snapshot_is_cache(chat)


# =============================================================================================
# 3. kill -9 while saving

# point (tests/fork_server.py says what each is) -> nth arrival. The child's first line saves a
# chunk and the session's list (files 1, 2); its second, an /edit of that turn, splits the chunk
# the edit leaves in its middle (files 3 and 4 are the halves, 5 the new chunk, then the whole
# goes)
KILL_POINTS = {
    "mid-write": 3,
    "before-rename": 5,
    "split-before-rename": 3,
    "split-before-cleanup": 1,
    "after-commit": 2,
    "in-transaction": 2,
    "mid-decode": 20,
}
LINES = [f"Question {i}: tell me about caches, keys and values, and the prefix {i}." for i in
         range(30)]  # fmt: skip


def big_history(n_pairs: int = 16) -> list[tuple[str, str]]:
    rng = random.Random(7)
    words = ("the cache keys values tokens prefix model capital France Paris hello there how "
             "are you user assistant system more words for merges").split()  # fmt: skip
    out = []
    for i in range(n_pairs):
        out.append(("user", f"{i}. " + " ".join(rng.choice(words) for _ in range(20)) + "?"))
        out.append(("assistant", " ".join(rng.choice(words) for _ in range(60)) + "."))
    return out


@pytest.fixture(scope="module")
def kill_base(tinies, tmp_path_factory) -> Path:
    """A store with a big history (about 2k tokens) and its snapshot, built once."""
    home = tmp_path_factory.mktemp("kill-base") / "store"

    def open_chat(loaded: Any, home: Path) -> Any:  # closed by build_session
        return open_conversation(loaded, home, TINY)

    sid = build_session(open_chat, tinies.a, home, big_history(), turns=("Start.",))
    assert KVStore(home / "kv").n_tokens_on_disk(sid) > 1800
    return home


def fork_server(job: dict[str, Any], root: Path, timeout: float = 300) -> Any:
    """Run tests/fork_server.py on `job`; returns its results."""
    (root / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([str(PYTHON), str(TESTS / "fork_server.py"), str(root / "job.json")],
                          cwd=root, env=kvrepl_env(root / "unused"), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def killed(tinies, kill_base, tmp_path_factory) -> dict[str, tuple[Path, Done]]:
    """Each kill point in its own copy of the big store."""
    root = tmp_path_factory.mktemp("killed")
    for point in KILL_POINTS:
        shutil.copytree(kill_base, root / point / "store")
    lines = [LINES[0], f"/edit 18 {LINES[1]}", *LINES[2:8]]  # the store holds 17 turns
    (root / "lines.txt").write_text("\n".join(lines) + "\n")
    job = {"kind": "points", "root": str(root), "points": KILL_POINTS, "model": str(tinies.folder),
           "stdin": str(root / "lines.txt"),
           "argv": ["--model", str(tinies.folder), "--resume", *TINY_FLAGS]}  # fmt: skip
    results = fork_server(job, root)
    # One file held each child's stdout and stderr.
    return {p: (root / p / "store", Done(r["rc"], r["out"], r["out"])) for p, r in results.items()}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_a_chosen_point_leaves_a_store_that_resumes(point, killed, tinies, chats,
                                                              tmp_path):  # fmt: skip
    killed_home, run = killed[point]
    home = tmp_path / "store"  # resume in a copy: the killed store stays as the kill left it
    shutil.copytree(killed_home, home)
    assert run.rc == -signal.SIGKILL, f"the child was not killed at {point}:\n{run.out}"
    assert len(run.stats()) >= 1  # it got past one turn of its own
    no_half_turn(home / "kvrepl.db")

    store = Store(home / "kvrepl.db")  # opens: no exception
    session = store.latest_session()
    assert session is not None and session.name == "demo"
    branch = store.active_branch(session.id)
    with_stats = {m.id for m, _ in store.turn_stats(session.id)}
    assert all(m.id in with_stats for m in branch if m.role == "assistant")
    store.close()
    on_disk = snapshot(home, session.id, tinies.a)
    assert on_disk.notes == [], on_disk.notes  # a kill leaves a valid snapshot, never a torn one
    assert on_disk.ids

    # Evidence that the kill landed where it was meant to.
    names = os.listdir(KVStore(home / "kv").pool_dir(tinies.a.fingerprint))
    if point in ("mid-write", "before-rename", "split-before-rename"):
        assert any(n.startswith(".tmp-") for n in names), names  # a temp file, never trusted
    if point == "split-before-cleanup":  # the whole chunk and its first half start together
        starts = [Ref.parse(n).start for n in names if Ref.parse(n)]
        assert len(starts) > len(set(starts)), names
    last = (branch[-1].role, turn_row_sum(home, branch[-1].id))
    if point == "after-commit":  # the edited turn is stored, its snapshot is the previous one
        assert last[0] == "assistant" and len(on_disk.ids) <= last[1]
    if point in ("in-transaction", "mid-decode"):  # the answer was never stored
        assert last[0] == "user"

    chat = chats(tinies.a, home)
    chat.sessions.resume_latest()
    history = chat.history()
    text = "After the crash: what is a prefix?"
    prompt = prompt_ids(chat, history, text)
    result = turn(chat, text)
    reused = expected_reuse(on_disk.ids, prompt)
    # Restored: the last snapshot (then cut where the messages differ), or, killed after an
    # edit's save split a chunk, just the part before the edit, which the pool holds as a chunk
    assert result.notices[0] in {f"snapshot: restored {n:,} cached tokens from disk"
                                 for n in (len(on_disk.ids), reused)}, result.notices  # fmt: skip
    assert reused > 1800  # the big history is not recomputed
    assert (result.stats.reused_tokens, result.stats.prefilled_tokens) == (
        reused, len(prompt) - reused)  # fmt: skip
    chat.model.get().engine.pc.check()
    ref = fresh_ids(chats, tinies.a, history, text, tmp_path / "ref")
    assert result.ids == ref.ids
    assert_snapshot_is_cache(chat)
    no_half_turn(home / "kvrepl.db")


def turn_row_sum(home: Path, message_id: int) -> int:
    """reused + prefilled + generated of a turns row: the cache length after that turn."""
    conn = sqlite3.connect(home / "kvrepl.db")
    row = conn.execute(
        "SELECT reused_tokens + prefilled_tokens + generated_tokens FROM turns "
        "WHERE message_id = ?", [message_id]
    ).fetchone()  # fmt: skip
    conn.close()
    return row[0] if row else 0


def test_in_transaction_kill_rolls_the_answer_back(killed):
    """Killed between the answer's insert and its turns row: neither is in the database, and
    the user message of that turn (written before computing) is the head."""
    home, _ = killed["in-transaction"]
    store = Store(home / "kvrepl.db")
    session = store.latest_session()
    assert session is not None
    branch = store.active_branch(session.id)
    store.close()
    assert branch[-1].role == "user" and branch[-1].content == LINES[1]  # the edit of LINES[0]
    assert branch[-3].content == "Start." and LINES[0] not in [m.content for m in branch]


def test_kill_9_at_random_moments_then_kvrepl_resume(tinies, kill_base, chats, tmp_path):
    """Three lives of kvrepl on one store, each killed after its first answer: at a random
    moment, the moment a temporary snapshot file exists (mid-save), at a random moment. Then a
    real `kvrepl --resume` process answers, consistently with what is on disk."""
    home = tmp_path / "store"
    shutil.copytree(kill_base, home)
    sid, _ = session_turns(home)
    args = ["--model", str(tinies.folder), "--resume", *TINY_FLAGS]
    (tmp_path / "lines.txt").write_text("\n".join(LINES) + "\n")
    job = {"kind": "lives", "home": str(home), "sid": sid, "seed": 1234, "argv": args,
           "model": str(tinies.folder),
           "modes": ["random", "tmp", "random"], "stdin": str(tmp_path / "lines.txt"),
           "outdir": str(tmp_path)}  # fmt: skip
    lives = fork_server(job, tmp_path)
    moments = [life["moment"] for life in lives]
    print("kill moments:", moments)
    for life in lives:
        assert life["rc"] == -signal.SIGKILL, (moments, life["out"])
        assert stats_of(life["out"]), life["out"]
    no_half_turn(home / "kvrepl.db")

    # The store opens, the last session resumes and its first turn is consistent.
    store = Store(home / "kvrepl.db")
    assert store.latest_session().id == sid  # type: ignore[union-attr]
    history = store.active_branch(sid)
    store.close()
    on_disk = snapshot(home, sid, tinies.a)
    assert on_disk.notes == [] and on_disk.ids, (moments, on_disk.notes)
    text = "After three crashes: what is a prefix?"
    rt = Runtime.build(tinies.a, TINY)
    msgs = [as_prompt(m) for m in history]  # answers as the ids they were generated as
    prompt = rt.prompt.render([*msgs, {"role": "user", "content": text}])
    run = run_kvrepl(args, home=home, stdin=text + "\n", timeout=240)
    assert run.rc == 0, run.err
    assert f"snapshot: restored {len(on_disk.ids):,} cached tokens" in run.err
    reused = expected_reuse(on_disk.ids, prompt)
    assert reused > 1800
    ((r, p, g),) = run.stats()
    assert (r, p) == (reused, len(prompt) - reused), moments
    _, turns = session_turns(home)
    last, stats = turns[-1]
    assert (stats["reused_tokens"], stats["prefilled_tokens"], stats["generated_tokens"]) == (
        r, p, g)  # fmt: skip
    assert KVStore(home / "kv").n_tokens_on_disk(sid) == r + p + g
    no_half_turn(home / "kvrepl.db")
    # The answer is the one a process that reuses nothing gives.
    ref = fresh_ids(chats, tinies.a, history, text, tmp_path / "ref")
    assert last.content == ref.answer and g == ref.stats.generated_tokens


# =============================================================================================
# 4. autosave


def test_autosave_after_each_answer_and_after_an_interrupt(tinies, chats, tmp_path):
    home = tmp_path / "store"
    chat = chats(tinies.a, home)
    session = chat.sessions.open_or_create("demo")
    db = sqlite3.connect(home / "kvrepl.db")
    db.row_factory = sqlite3.Row
    try:
        for i, text in enumerate(["Hello there, how are you?", "Tell me about caches.",
                                  "And the prefix?"]):  # fmt: skip
            result = turn(chat, text)
            # The answer and its stats are in the database (read by another connection) ...
            rows = db.execute(
                "SELECT m.role, m.content, m.interrupted, t.* FROM messages m "
                "JOIN turns t ON t.message_id = m.id WHERE m.session_id = ? ORDER BY m.id",
                [session.id],
            ).fetchall()
            assert len(rows) == i + 1
            row = rows[-1]
            assert (row["role"], row["content"], row["interrupted"]) == (
                "assistant", result.answer, 0)  # fmt: skip
            assert {name: row[name] for name in STAT_NAMES} == result.stats.as_dict()
            # ... and the snapshot on disk is the engine's cache.
            assert chat.kv.n_tokens_on_disk(session.id) == len(chat.model.get().engine.pc.ids)
            assert_snapshot_is_cache(chat)

        # Interrupted after the first piece of text (Ctrl-C closes the turn's generator).
        events = chat.send("Now a long answer, please.")
        for event in events:
            if isinstance(event, TextDelta):
                break
        events.close()
        row = db.execute(
            "SELECT m.role, m.interrupted, t.generated_tokens FROM messages m "
            "JOIN turns t ON t.message_id = m.id WHERE m.session_id = ? ORDER BY m.id DESC",
            [session.id],
        ).fetchone()
        assert (row["role"], row["interrupted"]) == ("assistant", 1)
        assert 1 <= row["generated_tokens"] < TINY.max_tokens
        assert_snapshot_is_cache(chat)
        no_half_turn(home / "kvrepl.db")
    finally:
        db.close()


def test_cli_end_of_input_loses_nothing(tinies, tmp_path, monkeypatch, capsys):
    """The line loop (stdin not a terminal) in-process: at EOF every turn is stored and the
    snapshot holds the last answer's cache."""
    import io

    from kvrepl import cli

    home = tmp_path / "store"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nTell me about caches.\n"))
    rc = cli.main(["--model", str(tinies.folder), "--session", "eof", *TINY_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0, out
    sid, turns = session_turns(home, "eof")
    assert len(turns) == 2
    last = turns[-1][1]
    assert KVStore(home / "kv").n_tokens_on_disk(sid) == (
        last["reused_tokens"] + last["prefilled_tokens"] + last["generated_tokens"]
    )
    assert snapshot(home, sid, tinies.a).notes == []
    no_half_turn(home / "kvrepl.db")
