"""SIGTERM and SIGHUP (a `kill`, a terminal closed under kvrepl) at each stage of a turn, in a
real kvrepl process: as after Ctrl-C, what was generated is kept (the answer marked interrupted,
unless the signal came once it was whole), the snapshot agrees with the conversation and a next
turn reuses it and answers as a recomputation does; then kvrepl ends, exit status 128 + the
signal, without reading its next line. Each process sends itself the signal at the stage
(tests/faults/signalled_kvrepl.py says where)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import FAULT_SETTINGS, db_messages, fault_lines, reference_answer
from helpers import close_conversation, open_conversation
from procs import PYTHON, ROOT, Done, kvrepl_env, stats_of

from kvrepl.events import Notice
from kvrepl.ids import common_prefix
from kvrepl.store.kvstore import KVStore

SCRIPT = Path(__file__).with_name("signalled_kvrepl.py")
CASES = [(sig, stage) for sig in ("TERM", "HUP") for stage in ("prefill", "decode", "save")]
LINES = b"hello there\nhow are you\nnever read\n"  # the signal comes in the second turn


@pytest.fixture(scope="module")
def signalled(tmp_path_factory, model_dir) -> Iterator[dict[tuple[str, str], tuple[Path, Done]]]:
    """Every case's process, started together; (its store, what it left) by case."""
    root = tmp_path_factory.mktemp("signalled")
    (root / "lines.txt").write_bytes(LINES)
    procs = {}
    for sig, stage in CASES:
        folder = root / f"{sig}-{stage}"
        folder.mkdir()
        args = ["--store", str(folder / "store"), "--model", str(model_dir), "--session", "k",
                "--temperature", "0", "--max-tokens", "6", "--repetition-penalty", "1"]  # fmt: skip
        with (open(root / "lines.txt", "rb") as stdin, open(folder / "out", "wb") as out,
              open(folder / "err", "wb") as err):  # fmt: skip
            procs[sig, stage] = subprocess.Popen(
                [str(PYTHON), str(SCRIPT), f"{sig}:{stage}:2", *args], stdin=stdin, stdout=out,
                stderr=err, cwd=ROOT, env=kvrepl_env())  # fmt: skip
    try:
        done = {}
        for case, proc in procs.items():
            rc = proc.wait(timeout=300)
            folder = root / "-".join(case)
            done[case] = (folder / "store", Done(rc, (folder / "out").read_text(),
                                                 (folder / "err").read_text()))  # fmt: skip
        yield done
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("sig,stage", CASES)
def test_a_signal_at_each_stage_keeps_the_turn_and_ends_kvrepl(sig, stage, signalled,
                                                               dir_loaded, tmp_path):  # fmt: skip
    killed, done = signalled[sig, stage]
    assert done.rc == 128 + getattr(signal, f"SIG{sig}"), done.err
    assert done.err.endswith(f"kvrepl: ended by SIG{sig}; everything is saved\n"), done.err
    assert "error" not in done.err
    rows = db_messages(killed)
    assert [r[0] for r in rows] == ["user", "assistant"] * 2, rows  # "never read" never read
    assert rows[-1][2] == (stage != "save")  # whole before the save: not interrupted
    (_, _, first), (reused, prefilled, generated) = stats_of(done.err)
    home = tmp_path / "store"  # go on in a copy: the store stays as the signal left it
    shutil.copytree(killed, home)
    chat = open_conversation(dir_loaded, home, FAULT_SETTINGS)
    try:
        chat.sessions.open("k")
        history = chat.history()
        kept = list(history[-1].token_ids or ())
        assert len(kept) == generated  # what was generated is kept, all of it
        if stage == "prefill":
            assert kept == [] and reused > 0 and prefilled == 8  # one chunk of its prompt
        elif stage == "decode":
            assert 0 < generated < 6
        else:
            assert generated == 6
        msgs = chat.prompt_messages(history[:-1])
        assert reference_answer(dir_loaded, msgs, 6)[:generated] == kept
        snapshot = KVStore(home / "kv").load_session(chat.session.id, dir_loaded.fingerprint)
        assert snapshot.notes == []
        # what was computed: the prompt's chunk (prefill), the prompt and what was fed after it
        assert len(snapshot.ids) >= reused + prefilled > first
        assert stage != "prefill" or len(snapshot.ids) == reused + prefilled
        sent = chat.send("and then?")
        events = list(sent)
        engine = chat.model.get().engine
        notes = "\n".join(e.text for e in events if isinstance(e, Notice))
        assert fault_lines(notes) == [], notes  # the snapshot was taken whole
        stats = sent.result.stats
        assert stats is not None
        # reused: all of the snapshot that the conversation still renders (an interrupted
        # answer's text may stop short of its last id), the turn's prompt at least
        reuse = common_prefix(snapshot.ids, engine.pc.ids)
        assert stats.reused_tokens == reuse >= reused + prefilled
        msgs = chat.prompt_messages(chat.history()[:-1])
        assert list(engine.progress.generated) == reference_answer(dir_loaded, msgs, 6)
    finally:
        close_conversation(chat)
