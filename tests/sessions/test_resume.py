"""Sessions on disk (issue 3): a conversation and its KV cache survive the process.

Round trip across processes on the real model (`python -m kvrepl` with piped stdin): a resumed
session prefills only the new turn, says what it restored, and answers exactly as one
uninterrupted process that recomputes every turn (`--no-reuse`, the baseline) does. Autosave:
after each answer the database holds the turn and the snapshot holds the cache, also at the end
of input and after an interrupt.
"""

from __future__ import annotations

import io
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import Done, Kvrepl
from session_helpers import (
    QUESTIONS,
    REAL_FLAGS,
    TINY,
    TINY_FLAGS,
    assert_snapshot_is_cache,
    expected_reuse,
    no_half_turn,
    session_turns,
    snapshot,
    turn,
)

from kvrepl.app import cli
from kvrepl.events import TextDelta
from kvrepl.store.db import STAT_NAMES
from kvrepl.store.kvstore import KVStore

# =============================================================================================
# round trip across processes, real model


@dataclass
class RealRuns:
    a: Done  # --session demo, turns 1-2, then EOF
    resumed: dict[str, Done]  # "--resume" / "--session": turn 3 in a copy of a's store
    whole: Done  # one process, turns 1-3
    baseline: Done  # one process, turns 1-3, --no-reuse
    homes: dict[str, Path]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    base = tmp_path_factory.mktemp("real-runs")
    homes = {k: base / k / "store" for k in ("a", "resume", "session", "whole", "baseline")}
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
    pb = Kvrepl(["--session", "demo", "--no-reuse", *REAL_FLAGS], home=homes["baseline"],
                stdin="\n".join(QUESTIONS) + "\n")  # fmt: skip
    resumed = {"resume": pr.finish(240), "session": ps.finish(240)}
    baseline = pb.finish(240)
    for name, run in [("a", a), ("whole", whole), ("baseline", baseline), *resumed.items()]:
        assert run.rc == 0, f"{name}: rc {run.rc}\n{run.out}\n{run.err}"
    return RealRuns(a, resumed, whole, baseline, homes)


@pytest.mark.model
@pytest.mark.parametrize("how", ["resume", "session"])
def test_resumed_process_prefills_only_the_new_turn(real_runs: RealRuns, real, how: str):
    from kvrepl.chat.prompt import Prompt

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
@pytest.mark.parametrize("how", ["resume", "session", "whole"])
def test_resumed_answers_equal_one_process_that_reuses_nothing(real_runs: RealRuns, how: str):
    """The answers, as the ids they were generated as, equal the --no-reuse baseline's, which
    reused nothing (and so does one uninterrupted process that reuses)."""
    _, turns = session_turns(real_runs.homes[how])
    _, baseline = session_turns(real_runs.homes["baseline"])
    assert [s["reused_tokens"] for _, s in baseline] == [0, 0, 0]
    assert [s["reused_tokens"] > 0 for _, s in turns] == [False, True, True]
    assert [m.token_ids for m, _ in turns] == [m.token_ids for m, _ in baseline]
    answers = [m.content for m, _ in turns]
    assert answers == [m.content for m, _ in baseline]
    assert all(answers) and answers[0] != answers[1] != answers[2]


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
# autosave


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
