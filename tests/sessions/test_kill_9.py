"""Sessions on disk (issue 3): kill -9 in the middle of saving, at chosen points (the child kills
itself: tests/fork_server.py) and at random moments (the test kills `kvrepl`): the store opens,
no half turn, `kvrepl --resume` works and its first turn is consistent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import open_conversation
from procs import PYTHON, TESTS, Done, kvrepl_env, run_kvrepl, stats_of
from session_helpers import (
    TINY,
    TINY_FLAGS,
    as_prompt,
    assert_snapshot_is_cache,
    build_session,
    expected_reuse,
    fresh_ids,
    no_half_turn,
    prompt_ids,
    session_turns,
    snapshot,
    turn,
)

from kvrepl.chat.handle import Runtime
from kvrepl.ids import common_prefix
from kvrepl.store.db import Store
from kvrepl.store.kvbook import Pool, Ref
from kvrepl.store.kvstore import KVStore
from kvrepl.store.records import Message
from kvrepl.store.stfile import BadChunk, parse_chunk, read_chunk

# =============================================================================================
# kill -9 while saving

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

    # Evidence that the kill landed where it was meant to, and nowhere else.
    edit = branch[-1] if branch[-1].role == "user" else branch[-2]
    assert edit.content == LINES[1], "the child did not get to its /edit"
    answer = fresh_ids(chats, tinies.a, branch[: branch.index(edit)], LINES[1], tmp_path / "edit")
    assert_killed_at(point, KVStore(home / "kv").pool_dir(tinies.a.fingerprint), branch,
                     printed_after_edit(run.out), answer.answer)  # fmt: skip

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


def assert_killed_at(point: str, d: Path, branch: list[Message], printed: str,
                     answer: str) -> None:  # fmt: skip
    """The store and the child's output show the kill at `point` (KILL_POINTS) and no other. The
    child's second line, an /edit, splits the chunk it leaves in its middle into two halves, the
    whole then goes, and the edit's own chunk follows the first half; `answer` is the edit's
    answer (a recomputation's), `printed` what the child showed of it."""
    refs = Pool.refs(d)
    temps = [n for n in os.listdir(d) if n.startswith(".tmp-")]
    pairs = halves_beside_wholes(refs)
    if point in ("mid-write", "split-before-rename", "before-rename"):
        assert len(temps) == 1, temps
        target, whole_file = temp_target(d / temps[0])
        assert whole_file == (point != "mid-write"), (point, temps)  # half written, or all
        assert target.name not in {r.name for r in refs}
        if point == "before-rename":  # the split is done: the edit's chunk after the first half
            first = [r for r in refs if r.tip == target.parent and r.end == target.start]
            assert first and not pairs, (target, refs)
            assert any((r.parent, r.start) == (target.parent, target.start) for r in refs)
        else:  # the split's first half, beside the whole it comes from, no half on disk yet
            assert not pairs and any(r.end > target.end and (r.parent, r.start) == (
                target.parent, target.start) for r in refs), (target, refs)  # fmt: skip
        return
    assert temps == [], temps
    if point == "split-before-cleanup":  # both halves written, the whole not gone
        ((whole, first),) = pairs
        assert any(r.parent == first.tip and r.end == whole.end for r in refs), refs
        return
    assert not pairs, refs  # the edit's save never began: no split
    stored = branch[-1]
    if point == "after-commit":  # the edit's answer is stored; its snapshot was not saved
        assert (stored.role, stored.content) == ("assistant", answer)
    elif point == "in-transaction":  # the whole answer shown, rolled back while being stored
        assert (stored.role, printed) == ("user", answer.strip())
    else:  # mid-decode: the answer cut short, never stored
        assert stored.role == "user" and printed and answer.strip().startswith(printed), printed
        assert len(printed) < len(answer.strip()), printed
    assert point in ("after-commit", "in-transaction", "mid-decode"), point


def halves_beside_wholes(refs: list[Ref]) -> list[tuple[Ref, Ref]]:
    """(a chunk, a shorter one from the same place): a split's whole beside its first half."""
    return [(r, s) for r in refs for s in refs
            if s.end < r.end and (s.parent, s.start) == (r.parent, r.start)]  # fmt: skip


def temp_target(path: Path) -> tuple[Ref, bool]:
    """The chunk a temp file was to become (its name says), and whether its bytes are whole."""
    ref = Ref.parse(path.name.removeprefix(".tmp-").rsplit("-", 2)[0])
    assert ref is not None, path.name
    try:
        parse_chunk(*read_chunk(path, header_only=False), ref.name)
    except BadChunk:
        return ref, False
    return ref, True


def printed_after_edit(out: str) -> str:
    """What the child printed after the /edit's cut line (its answer, whole or cut short)."""
    _, cut, rest = out.partition("tokens\n\n")
    return rest.strip() if cut and "cache: cut at token" in out else ""


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
    # The second life was killed while a snapshot file was being written, not anywhere.
    assert moments[1] == "mid-save (a temp file was present)", moments
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
    # What a resume restores: the session's last snapshot, or, when a life was killed after a
    # save had written chunks past it but before it recorded them as the session's, the longer
    # chain those chunks make for the prompt (each chunk validated on load).
    found = KVStore(home / "kv").find(tinies.a.fingerprint, prompt[: len(prompt) - 1])
    pool_end = found[-1].end if found else 0
    restored = on_disk.ids if common_prefix(on_disk.ids, prompt) >= pool_end else prompt[:pool_end]
    run = run_kvrepl(args, home=home, stdin=text + "\n", timeout=240)
    assert run.rc == 0, run.err
    assert f"snapshot: restored {len(restored):,} cached tokens" in run.err, (moments, pool_end)
    reused = expected_reuse(restored, prompt)
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
