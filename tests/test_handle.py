"""The model handle (kvrepl/chat/handle.py): the one door to the model. Loaded in a thread or given
ready; `get()` waits and re-raises a failure as one KvreplError; the label, the status and the
cached-token count never wait."""

from __future__ import annotations

import threading

import pytest
from helpers import TINY_SETTINGS, tiny_loaded

from kvrepl.chat.handle import ModelHandle, Runtime
from kvrepl.config import Settings
from kvrepl.errors import KvreplError, UsageError


def test_a_handle_given_a_runtime_is_ready_and_says_what_it_holds(tiny):
    rt = Runtime.build(tiny_loaded(tiny), TINY_SETTINGS)
    handle = ModelHandle.ready_with(rt, TINY_SETTINGS)
    assert handle.ready() and handle.get() is rt and handle.peek() is rt
    assert handle.label == "tiny (test)" and handle.status() == "tiny (test)"
    assert handle.cached_tokens() == 0


def test_loading_in_the_background_does_not_block_the_questions(tiny):
    rt = Runtime.build(tiny_loaded(tiny), TINY_SETTINGS)
    go = threading.Event()

    def slow() -> Runtime:
        go.wait(10)
        return rt

    handle = ModelHandle(Settings(model="some-model"), load=slow).start()
    assert not handle.ready() and handle.peek() is None
    assert handle.label == "some-model" and handle.status() == "loading the model…"
    assert handle.cached_tokens() is None
    go.set()
    assert handle.get() is rt and handle.ready()


def test_a_failed_load_is_one_error_each_time_it_is_asked_for():
    def broken() -> Runtime:
        raise OSError("no such file")

    handle = ModelHandle(Settings(), load=broken).start()
    for _ in range(2):
        with pytest.raises(KvreplError, match="the model failed to load: no such file"):
            handle.get()
    assert handle.status() == "the model failed to load" and handle.peek() is None


def test_a_handle_without_a_model_refuses():
    with pytest.raises(UsageError, match="does not load a model"):
        ModelHandle.none(Settings()).get()


def test_a_first_start_leaves_the_tokenizer_to_the_background_load(tmp_path, monkeypatch):
    """Before the prompt, a GGUF's first start is said and its tokenizer is not read (the load,
    in its thread, reads it); the status says what the wait is for until the load is done."""
    from kvrepl.chat.handle import FIRST_START_STATUS
    from kvrepl.engine import firststart, models

    monkeypatch.setenv("KVREPL_CACHE", str(tmp_path / "cache"))
    rt = object()
    go = threading.Event()

    def slow() -> Runtime:
        go.wait(10)
        return rt  # type: ignore[return-value]

    handle = ModelHandle(Settings(), load=slow)
    said: list[str] = []
    handle.prepare(said.append)
    assert said == ["first start with this model: reading its tokenizer once (about 8 s)…"]
    assert not firststart.meta_folder(models.embedded_gguf()).exists()
    handle.start()
    assert handle.status() == FIRST_START_STATUS
    go.set()
    assert handle.get() is rt and handle.ready()
