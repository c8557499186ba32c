"""kvrepl's CLI with one fault injected, so that a test can kill a real process at a chosen moment
(procs.kvrepl_command(args, fault=...) runs it):

    python tests/faulty_kvrepl.py FAULT:N [kvrepl arguments...]

FAULT is one of
    kill-after-commit   SIGKILL at the Nth snapshot save: the turn's answer is committed to
                        SQLite, the snapshot is not written
    snapshot-then-kill  at the Nth answer stored, write the snapshot first, then SIGKILL before
                        the answer is committed (the other order)
    kill-mid-write      at the Nth chunk write, write half the bytes of the temp file, then
                        SIGKILL (a kill during a save; the writes of sessions' lists of
                        chunks do not count)

The faults go in at public doors: the snapshot store's `save`, the conversation's store's
`finish_answer` and its `snapshots`, and the `open` of the module that writes chunk files.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _writes_a_chunk(file: Any, mode: str) -> bool:
    """Whether `open` writes a chunk's temp file, not a session's list of chunks: the atomic
    writer opens it by descriptor, and its name says which."""
    name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else str(file)
    return "w" in mode and ".safetensors-" in name


class HalfWriter(io.RawIOBase):
    """A file whose first write writes half of its bytes, syncs them, then SIGKILLs."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: Any) -> int:
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        _kill()
        return 0

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def install_fault(spec: str) -> None:
    name, _, n = spec.partition(":")
    nth = int(n or 1)
    count = [0]

    def due() -> bool:
        count[0] += 1
        return count[0] == nth

    if name == "kill-after-commit":
        from kvrepl.store.kvstore import KVStore

        save = KVStore.save

        def save_or_die(self: Any, *a: Any, **k: Any) -> Any:
            if due():
                _kill()
            return save(self, *a, **k)

        KVStore.save = save_or_die
    elif name == "snapshot-then-kill":
        from kvrepl.chat.conversation import Conversation

        at = Conversation.at

        def at_(home: Any, settings: Any, model: Any) -> Conversation:
            chat = at(home, settings, model)  # the one the CLI runs
            finish_answer = chat.store.finish_answer

            def snapshot_first(session_id: str, *a: Any, **k: Any) -> Any:
                if due():  # the snapshot the turn's end would save after this commit
                    rt = chat.model.get()
                    chat.kv.budget = chat.settings.kv_budget_mb << 20
                    chat.snapshots.save(session_id, rt.engine, rt.loaded.fingerprint)
                    _kill()
                return finish_answer(session_id, *a, **k)

            chat.store.finish_answer = snapshot_first
            return chat

        Conversation.at = staticmethod(at_)  # type: ignore[method-assign]
    elif name == "kill-mid-write":
        import builtins

        from kvrepl.store import kvbook

        def fault_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            f = builtins.open(file, mode, *a, **k)
            return HalfWriter(f) if _writes_a_chunk(file, mode) and due() else f

        kvbook.open = fault_open  # the module's own `open`, used by its atomic writer
    else:
        raise SystemExit(f"unknown fault {spec!r}")


if __name__ == "__main__":
    install_fault(sys.argv[1])
    from kvrepl.app.cli import main

    sys.exit(main(sys.argv[2:]))
