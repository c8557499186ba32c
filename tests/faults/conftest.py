"""Fixtures of the fault tests: the tiny fault model (its answers are varied text), as a
LoadedModel and as a model folder for `kvrepl --model DIR`; harnesses over it; a store with a
snapshot of several chunks to break; and the real kvrepl processes, started in the background
when the first test here starts."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import (
    KILLS,
    assert_whole_turns,
    chunk_files,
    fault_harness,
    make_fault_model,
    make_loaded,
)
from helpers import Harness
from procs import Jobs

from kvrepl.chat.conversation import Conversation
from kvrepl.chat.handle import ModelHandle
from kvrepl.config import Settings
from kvrepl.store.db import Store


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def model(tok):
    return make_fault_model(tok)


@pytest.fixture(scope="module")
def loaded(model, tok):
    return make_loaded(model, tok)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny) -> Path:
    """The tiny fault model (the same weights as `model`) as a model folder, for `kvrepl --model
    DIR` in another process."""
    tok = tiny[1]
    d = tmp_path_factory.mktemp("models") / "tinyfault"
    make_fault_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def dir_loaded(model_dir):
    """The same folder loaded here exactly as the CLI loads it (same fingerprint)."""
    from kvrepl.engine import models

    return models.load(str(model_dir), device="cpu", dtype="auto", progress=False)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    """make(loaded, home=None, **settings) -> Harness (fault_harness); all closed at the end of
    the test."""
    made: list[Harness] = []

    def _make(loaded: Any, home: Path | None = None, **settings: Any) -> Harness:
        h = fault_harness(home or tmp_path / "store", loaded, **settings)
        made.append(h)
        return h

    yield _make
    for h in made:
        h.close()


@pytest.fixture(scope="module")
def snap_home(tmp_path_factory, loaded) -> tuple[Path, str]:
    """A store whose session 'snap' has 3 turns and a snapshot of at least two chunks."""
    home = tmp_path_factory.mktemp("snap") / "store"
    h = fault_harness(home, loaded)
    try:
        h.lines("/save snap", "hello there", "how are you")
        h.line("/load snap")  # the whole conversation: the next turn appends a chunk
        h.line("The capital of France")
        sid = h.sid
        assert len(chunk_files(home, sid)) >= 2
        assert_whole_turns(h, 3)
    finally:
        h.close()
    return home, sid


# ---------------------------------------------------------------------------------------------
# real processes, in the background


def tiny_cli(home: Path, model_dir: Path, *more: str) -> list[str]:
    return ["--store", str(home), "--model", str(model_dir), "--temperature", "0",
            "--max-tokens", "6", *more]  # fmt: skip


BAD_INPUT = (b"\xff\xfe hi\n/load nosuch\n/bogus\n/save ../../x\n\n   \n/edit\n"
             b"hello there\n/history\n")  # fmt: skip


def _newer_schema_store(home: Path) -> bytes:
    store = Store(home / "kvrepl.db")
    session = store.create_session("old")
    store.add_message(session.id, "user", "hello there")
    store.close()
    con = sqlite3.connect(home / "kvrepl.db")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    return (home / "kvrepl.db").read_bytes()


@pytest.fixture(scope="session", autouse=True)
def jobs(request, tmp_path_factory, model_dir) -> Iterator[Jobs]:
    """The cases that need a real kvrepl process (test_processes.py), started together when the
    first test of this folder starts (those whose tests are selected), side by side with the
    in-process tests of every file here (under pytest-xdist: when a test first waits for one,
    beside the other workers' tests); each test waits for its own. Stores live in
    <job>/store. (Session scope: a module's would start them with test_processes.py alone.)"""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    # Under pytest-xdist each worker collects every test, and would start every job: there they
    # start when a test first waits for one, on the worker that runs test_processes.py.
    j = Jobs(tmp_path_factory.mktemp("jobs"), defer="PYTEST_XDIST_WORKER" in os.environ)
    try:
        if "test_a_process_killed_around_the_turn_write_leaves_no_phantom_turn" in selected:
            for fault in KILLS:
                home = j.root / fault / "store"
                j.start(fault, tiny_cli(home, model_dir, "--session", "k"),
                        b"hello there\nhow are you\nnever read\n", fault=fault)  # fmt: skip
        if "test_a_second_kvrepl_on_the_same_session_is_refused" in selected:
            # The session is open in this process: a second kvrepl on it is refused.
            home = j.root / "held" / "store"
            holder = Conversation.at(home, Settings(), ModelHandle.none(Settings()))
            holder.sessions.open_or_create("held")
            j.start("held", tiny_cli(home, model_dir, "--session", "held"), b"hello there\n")
            j.cleanups["held"] = holder.close  # its database too: it opened it
        if "test_a_database_from_a_newer_kvrepl_is_refused_untouched" in selected:
            home = j.root / "schema" / "store"
            home.mkdir(parents=True)
            j.data["schema"] = _newer_schema_store(home)
            j.start("schema", ["--store", str(home)], b"hello there\n")
        if "test_bad_input_through_the_cli_is_replaced_or_refused" in selected:
            j.start("badinput", tiny_cli(j.root / "badinput" / "store", model_dir), BAD_INPUT)
        if "test_a_bad_session_name_on_the_real_command_line" in selected:
            j.start("slashname", tiny_cli(j.root / "slashname" / "store", model_dir,
                                          "--session", "../../x"), b"hello there\n")  # fmt: skip
        if "test_two_kvrepl_processes_writing_one_store_wait_for_each_other" in selected:
            for name in ("pair-a", "pair-b"):
                j.start(name, tiny_cli(j.root / "shared-store", model_dir, "--session", name),
                        b"hello there\nhow are you\nThe capital of France\n")  # fmt: skip
        # Terminals, with the embedded model: output to a file, stdin a pipe or /dev/null.
        if "test_piped_input_and_output_run_in_line_mode" in selected:
            j.start("echo-hi", ["--store", str(j.root / "echo-hi" / "store"), "--temperature",
                                "0", "--max-tokens", "8"], b"hi\n")  # fmt: skip
        if "test_stdin_from_dev_null_exits_cleanly" in selected:
            j.start("devnull", ["--store", str(j.root / "devnull" / "store")], None)
        yield j
    finally:
        j.stop()
