"""Sessions on disk (issue 3): every kind of invalid snapshot, made on the real files a
`Conversation` wrote: a notice, a correct recompute (greedy tokens equal a run that reuses
nothing), the cache invariant, and a healed snapshot afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from helpers import close_conversation
from session_helpers import (
    HISTORY,
    QUESTIONS,
    assert_snapshot_is_cache,
    build_session,
    expected_reuse,
    fresh_ids,
    prompt_ids,
    snapshot,
    turn,
)

from kvrepl.config import Settings
from kvrepl.ids import common_prefix
from kvrepl.store.kvbook import Ref
from kvrepl.store.kvstore import KVStore

# =============================================================================================
# invalid snapshots, through a Conversation


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
