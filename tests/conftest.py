"""Shared fixtures: a tiny random model with a tokenizer made here (fast tests, makers.py), and
the real embedded model, loaded once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from makers import make_tiny_model, make_tokenizer


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own store and no config file; the model conversion cache stays
    shared. The per-user folders point into tmp_path too, so that a child process started
    without KVREPL_* variables never reads or writes the user's own (Linux: XDG)."""
    home = tmp_path / "store"
    monkeypatch.setenv("KVREPL_HOME", str(home))
    monkeypatch.setenv("KVREPL_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return home


@pytest.fixture(scope="session", autouse=True)
def _embedded_model_converted(request: pytest.FixtureRequest) -> None:
    """Dequantize the embedded GGUF once, before any test starts kvrepl processes: on a fresh
    machine, several processes would otherwise each convert it at the same time. Skipped where
    no selected test needs the real model (a GPU run of `-m "not model"`, which has no GGUF)."""
    from kvrepl import models

    if request.config.getoption("-m") == "not model":
        return
    models.convert_gguf(models.embedded_gguf(), progress=False)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread. On a shared 2-core machine two OpenMP threads spin against each other
    and against other processes: the tiny model ran 50x slower and the real one 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 3-layer random Llama and a byte-level tokenizer. Fast."""
    tok = make_tokenizer()
    return make_tiny_model(len(tok)), tok


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch):
    """script(*answers): the next engine streams generate exactly these ids, one list each (end
    it with an end token, or let max_tokens cut it), in place of sampling. The model still
    computes the K/V of every token it is fed."""
    queue: list[list[int]] = []

    class Scripted:
        def __init__(self, *args: object) -> None:
            self.ids = iter(queue.pop(0))

        def seen(self, ids: object) -> None:
            pass

        def next_tensor(self, logits: object) -> torch.Tensor:
            return torch.tensor(next(self.ids))

    monkeypatch.setattr("kvrepl.engine.Sampler", Scripted)
    return lambda *answers: queue.extend(list(a) for a in answers)


@pytest.fixture(scope="session")
def real():
    """The embedded SmolLM2-135M-Instruct as kvrepl runs it by default (the CPU fast path: the
    GGUF's own Q4_1/Q8_0 weights), loaded once for the whole test session."""
    from kvrepl import models

    return models.load(progress=False)


@pytest.fixture(scope="session")
def real32():
    """The embedded model dequantized to float32 (`--dtype float32`), loaded once."""
    from kvrepl import models

    return models.load(dtype="float32", progress=False)


@pytest.fixture(params=["real", "real32"])
def real_any(request):
    """The real model in each mode kvrepl ships: the fast path and float32."""
    return request.getfixturevalue(request.param)
