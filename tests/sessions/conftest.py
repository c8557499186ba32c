"""Fixtures of the tests of sessions on disk: three tiny models saved as folders (built once), and
Conversations over them, each with its own engine, closed at the end of the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import close_conversation, open_conversation
from session_helpers import TINY, Tinies, load_folder, save_tiny_model

from kvrepl.chat.conversation import Conversation
from kvrepl.config import Settings
from kvrepl.engine.models import LoadedModel


@pytest.fixture(scope="session")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> Tinies:
    base = tmp_path_factory.mktemp("tiny-models")
    a = save_tiny_model(base / "a" / "model", seed=0)
    other = save_tiny_model(base / "other", seed=1)
    same = save_tiny_model(base / "b" / "model", seed=2)
    return Tinies(a, load_folder(a), load_folder(other), load_folder(same))


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
