"""Shared fixtures: a tiny random model with a tokenizer made here (fast tests, makers.py), and
the real models (the embedded SmolLM2, Gemma 3 270M), each loaded once per test session.

In CI (`CI=true`) a skipped test is a failure: a missing tmux, C compiler or model must not pass
unseen. The one exception is a test marked `gpu` (CI has no GPU), whose skip reason says where it
ran instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from makers import gemma_gguf, make_tiny_model, make_tokenizer

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a GPU; the one kind of test CI may skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """In CI, a skip (but a GPU test's) is reported as a failure that gives the skip's reason."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("gpu") is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where only a GPU test may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """In CI, a module that skips itself whole (`pytest.skip(..., allow_module_level=True)`, an
    `importorskip`) fails the same way: no test report would say so."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where only a GPU test may skip: {reason}"


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
    machine, several processes would otherwise each convert it at the same time (pytest-xdist's
    workers too: they take turns on a lock, and the later ones find it done). Skipped where no
    selected test needs the real model (a GPU run of `-m "not model"`, which has no GGUF)."""
    import fcntl

    from kvrepl.engine import firststart, models

    if request.config.getoption("-m") == "not model":
        return
    lock = firststart.cache_dir() / "models" / ".tests-convert.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        firststart.convert_gguf(models.embedded_gguf(), progress=False)


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

    monkeypatch.setattr("kvrepl.engine.engine.Sampler", Scripted)
    return lambda *answers: queue.extend(list(a) for a in answers)


@pytest.fixture(scope="session")
def real():
    """The embedded SmolLM2-135M-Instruct as kvrepl runs it by default (the CPU fast path: the
    GGUF's own Q4_1/Q8_0 weights), loaded once for the whole test session."""
    from kvrepl.engine import models

    return models.load(progress=False)


@pytest.fixture(scope="session")
def real8():
    """The embedded model on the CPU fast path with 8-bit K/V (`--kv-bits 8`), loaded once."""
    from kvrepl.engine import models

    return models.load(progress=False, kv_bits=8)


@pytest.fixture(scope="session")
def real32():
    """The embedded model dequantized to float32 (`--dtype float32`), loaded once."""
    from kvrepl.engine import models

    return models.load(dtype="float32", progress=False)


@pytest.fixture(scope="session")
def gemma():
    """Gemma 3 270M (Q4_K_M GGUF) on the CPU fast path, loaded once."""
    from kvrepl.engine import models

    return models.load(str(gemma_gguf()), progress=False)


@pytest.fixture(params=["real", "real32"])
def real_any(request):
    """The real model in each mode kvrepl ships: the fast path and float32."""
    return request.getfixturevalue(request.param)
