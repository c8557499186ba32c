"""A door the tests hold on the model: a probe the engine is given in place of the model (through
`Runtime.build` and a `LoadedModel`), which counts the model's forward passes and can make one of
them fail, before the model computes anything. Everything else is the model's own.

    probe = ModelProbe(loaded.model)
    rt = Runtime.build(dataclasses.replace(loaded, model=probe), settings)
    probe.raise_at(3, KeyboardInterrupt)  # Ctrl-C at the third forward from now
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ModelProbe:
    """A transformers model (the engine's HFRunner calls it as `model(input_ids=..., ...)`) or
    kvrepl's fast model (FastRunner calls `model.forward(ids, layers)`), with `calls`: the number
    of input ids of each forward that ran, and `before`: a hook called with that number before
    each forward (a hook that raises stops the forward, as a Ctrl-C or a failure inside the model
    would). Attributes it does not have are the model's (config, parameters, layers, lm_head)."""

    def __init__(self, model: Any) -> None:
        self.wrapped = model
        self.calls: list[int] = []
        self.before: Callable[[int], None] | None = None

    @property
    def __class__(self) -> type:  # noqa: D105
        """The model's class: the engine picks its runner by what the model is."""
        return type(self.wrapped)

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._enter(kwargs["input_ids"].shape[-1])
        return self.wrapped(*args, **kwargs)

    def forward(self, ids: list[int], *args: Any, **kwargs: Any) -> Any:
        """The fast model's forward; a transformers model is called, never this."""
        self._enter(len(ids))
        return self.wrapped.forward(ids, *args, **kwargs)

    def _enter(self, n: int) -> None:
        if self.before is not None:
            self.before(n)
        self.calls.append(n)

    def raise_at(self, n: int, exc: BaseException | type[BaseException], *,
                 every: bool = False) -> None:  # fmt: skip
        """Raise `exc` at the nth forward from now, once (`every`: at that one and all after it,
        until `heal`)."""
        seen = [0]

        def hook(_: int) -> None:
            seen[0] += 1
            if seen[0] == n and not every:
                self.before = None
            if seen[0] >= n:
                raise exc

        self.before = hook

    def heal(self) -> None:
        """No more faults: every forward runs."""
        self.before = None
