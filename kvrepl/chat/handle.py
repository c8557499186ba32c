"""The one door to the model: a handle that loads it in a background thread while the user types,
says whether it is ready, hands it over when it is (`get()` waits and re-raises a failure as one
KvreplError), and answers the questions the screen asks of it (its label, the toolbar's status,
how many tokens its cache holds) without waiting.

What exists once the model is loaded is a `Runtime`: the LoadedModel, its Prompt and its Engine.
The conversation, the commands, the REPL and the toolbar reach the model only through this
handle. Loading itself (resolving a spec, device, dtype, the fast path) is models.py's; a first
start's one-time work is firststart.py's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvrepl.config import Settings
from kvrepl.errors import KvreplError, UsageError

if TYPE_CHECKING:  # torch and transformers load in the background, after the prompt is up
    from kvrepl.chat.prompt import Prompt
    from kvrepl.engine.engine import Engine
    from kvrepl.engine.models import LoadedModel

LOADER_THREAD = "model-loader"
LOADING_STATUS = "loading the model…"
FIRST_START_STATUS = "loading the model (first start: reading its tokenizer once)…"


@dataclass
class Runtime:
    """What exists once the model is loaded."""

    loaded: LoadedModel
    prompt: Prompt
    engine: Engine

    @classmethod
    def build(cls, loaded: LoadedModel, settings: Settings) -> Runtime:
        from kvrepl.chat.prompt import Prompt
        from kvrepl.engine.engine import Engine

        prompt = Prompt(loaded.tokenizer)
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            end_ids=prompt.end_token_ids(getattr(loaded.model, "generation_config", None)),
            context_length=loaded.context_length,
            reuse=settings.reuse,
        )
        return cls(loaded, prompt, engine)


class ModelHandle:
    """The model, loaded once: in a thread after `start()`, or given ready (`ready_with`)."""

    def __init__(self, settings: Settings, *, progress: bool = False,
                 load: Callable[[], Runtime] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self._load = load or (lambda: _load(settings, progress))
        self._done = threading.Event()
        self._runtime: Runtime | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._first_start: str | None = None  # the status while a first start's work runs

    @classmethod
    def ready_with(cls, runtime: Runtime, settings: Settings | None = None) -> ModelHandle:
        """A handle over a model already loaded (tests, benchmarks)."""
        handle = cls(settings or Settings(), load=lambda: runtime)
        handle._finish()
        return handle

    @classmethod
    def none(cls, settings: Settings) -> ModelHandle:
        """A handle for the subcommands that never load a model: `get()` refuses."""

        def refuse() -> Runtime:
            raise UsageError("this command does not load a model")

        return cls(settings, load=refuse)

    def prepare(self, notice: Callable[[str], None]) -> None:
        """Before the prompt: what the user gave is checked (a template file, the device, the
        model's path, a .gguf's header), so that a mistake is one line now, not at the first
        message; and a first start's one-time work is said. Reading a GGUF's tokenizer (the
        fast path's, about 8 s) is left to the load, in the background while the user types;
        dequantizing a GGUF for transformers is done now (its progress bar, on stderr, would
        tear the input if it ran in the background)."""
        from kvrepl.engine import devices, firststart, models

        s = self.settings
        read_template(s)
        devices.check_device(s.device)
        source = models.resolve(s.model)
        firststart.check_gguf(source)
        note = firststart.first_start(source, s.dtype, s.device)
        if note is None:
            return
        notice(note)
        if firststart.uses_fast_path(source, s.dtype, s.device):
            self._first_start = FIRST_START_STATUS
        else:
            firststart.prepare(source, s.dtype, s.device, progress=True)

    def start(self) -> ModelHandle:
        """Load in a background thread (a daemon: kvrepl may end while it runs)."""
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self._finish, name=LOADER_THREAD, daemon=True)
            self._thread.start()
        return self

    def _finish(self) -> None:
        try:
            self._runtime = self._load()
        except BaseException as exc:  # handed to the thread that waits
            self._error = exc
        finally:
            self._done.set()

    def ready(self) -> bool:
        """Loaded (or failed): `get()` will not wait."""
        return self._done.is_set()

    def get(self) -> Runtime:
        """The model, waiting for it (loading it in this thread if nothing started it)."""
        if self._thread is None and not self._done.is_set():
            self._finish()
        self._done.wait()
        if self._error is not None:
            if isinstance(self._error, KvreplError):
                raise self._error
            raise KvreplError(f"the model failed to load: {self._error}") from self._error
        assert self._runtime is not None
        return self._runtime

    def peek(self) -> Runtime | None:
        """The model if it is loaded, else None; never waits, never raises."""
        return self._runtime if self._done.is_set() else None

    @property
    def label(self) -> str:
        """The model's name: its source's label once loaded, else what --model named."""
        rt = self.peek()
        return rt.loaded.source.label if rt is not None else (self.settings.model or "default")

    def cached_tokens(self) -> int | None:
        """How many tokens the engine's cache holds; None before the model is loaded."""
        rt = self.peek()
        return rt.engine.cached_tokens if rt is not None else None

    def status(self) -> str:
        """The toolbar's word on the model."""
        if not self.ready():
            return self._first_start or LOADING_STATUS
        if self._error is not None:
            return "the model failed to load"
        return self.label


def _load(settings: Settings, progress: bool) -> Runtime:
    from kvrepl.engine.models import load

    s = settings
    loaded = load(s.model, device=s.device, dtype=s.dtype, chat_template=read_template(s),
                  progress=progress, context=s.context, kv_bits=s.kv_bits,
                  gpu_weights=s.gpu_weights)  # fmt: skip
    return Runtime.build(loaded, s)


def read_template(settings: Settings) -> str | None:
    """The --chat-template file's text; UsageError in one line when it cannot be read."""
    if not settings.chat_template:
        return None
    path = Path(settings.chat_template).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--chat-template {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--chat-template {path}: a folder, not a template file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--chat-template {path}: cannot be read ({exc})") from None


def loading_in_background() -> bool:
    """A model still loading in its thread (kvrepl then leaves without waiting for it)."""
    return any(t.name == LOADER_THREAD and t.is_alive() for t in threading.enumerate())
