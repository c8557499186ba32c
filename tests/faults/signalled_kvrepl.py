"""kvrepl's CLI sending itself a signal at a chosen stage of its Nth turn, so that a test can stop
a real process where a user's `kill` or closed terminal would (test_signals.py runs it):

    python tests/faults/signalled_kvrepl.py SIGNAL:STAGE:N [kvrepl arguments...]

SIGNAL is TERM, HUP or INT; STAGE one of
    prefill   once the first chunk of the turn's prefill is computed, the rest not (the prefill
              runs in chunks of 8 tokens here)
    decode    once the turn's answer has shown its second piece of text
    save      as the turn's snapshot save begins (the answer is committed; the save runs on)

The signal goes in at public doors: the events of the engine's `stream` (a Progress between
prefill chunks, a TextDelta per piece of the answer) and the snapshot store's `save`; the process
sends it to itself, as `kill` would, so what happens next is kvrepl's own handling.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import closing
from typing import Any

PREFILL_CHUNK = 8


def install(spec: str) -> None:
    name, stage, n = spec.split(":")
    signum = getattr(signal, f"SIG{name}")
    state = {"streams": 0, "sent": False}

    def armed() -> bool:
        return state["streams"] == int(n) and not state["sent"]

    def send() -> None:
        state["sent"] = True
        os.kill(os.getpid(), signum)

    from kvrepl.engine import engine
    from kvrepl.events import Progress, TextDelta
    from kvrepl.store.kvstore import KVStore

    stream, save = engine.Engine.stream, KVStore.save

    def stream_(self: Any, *a: Any, **k: Any) -> Iterator[Any]:
        state["streams"] += 1
        self.chunk_size = PREFILL_CHUNK
        texts = 0
        with closing(stream(self, *a, **k)) as events:  # closed as the consumer would close it
            for event in events:
                texts += isinstance(event, TextDelta)
                if armed() and ((stage == "prefill" and isinstance(event, Progress)) or
                                (stage == "decode" and texts == 2)):  # fmt: skip
                    send()
                yield event

    def save_(self: Any, *a: Any, **k: Any) -> Any:
        if armed() and stage == "save":
            send()
        return save(self, *a, **k)

    engine.Engine.stream = stream_  # type: ignore[method-assign]
    KVStore.save = save_  # type: ignore[method-assign]


if __name__ == "__main__":
    install(sys.argv[1])
    from kvrepl.app.cli import main

    sys.exit(main(sys.argv[2:]))
