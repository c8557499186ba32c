"""How the engine runs a model: a runner wraps a transformers model (`HFRunner`) or a model on
kvrepl's own kernels (`FastRunner`, over a backend.KernelBackend) behind one small interface:
`forward(ids, prompt_cache)` feeds ids and returns the last position's logits, `new_layers()`
makes the cache's layers, and flags say what the engine may do with it (`ahead`: feed a token
still on the device; `drafts`: verify drafted tokens with every row's logits). `runner_for`
picks one. It owns no cache and no policy: the engine (engine.py) decides what to feed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kvrepl.backends.layers import GrowingLayer
from kvrepl.backends.protocol import KernelBackend
from kvrepl.engine.cache import PromptCache, hf_layers
from kvrepl.errors import ModelError


class HFRunner:
    """A transformers model as the engine runs it: its forward over the prompt cache's layers,
    the last position's logits out."""

    ahead = False
    batch_invariant = False  # transformers' kernels pick their reduction by the batch's size
    drafts = False  # verifying drafted tokens needs every row's logits: its forward keeps one

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self._cache_arg = cache_arg(model)
        param = next(model.parameters())
        self.device, self.kv_dtype = param.device, param.dtype
        # Spread over devices (accelerate's device_map): each layer's K/V lives on its layer's
        # device, and the logits come from the head's.
        self.layer_devices = [_device_of(layer, self.device) for layer in _decoder_layers(model)]
        head = getattr(model, "lm_head", None)
        self.logits_device = _device_of(head, self.device) if head is not None else self.device

    def new_layers(self) -> list[Any]:
        return hf_layers(self.config)

    def describe(self) -> str:
        """How the model computes, for /stats."""
        dt = str(self.kv_dtype).removeprefix("torch.")
        return f"{dt} on {self.device}, transformers' kernels"

    def forward(self, ids: list[int], pc: PromptCache) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        # the first layer that keeps every position (a hybrid model's first may be linear)
        first = next((la for la in pc.cache.layers if isinstance(la, GrowingLayer)), None)
        before = first.get_seq_length() if first is not None else None
        kwargs = {self._cache_arg: pc.cache}
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **kwargs)
        if first is not None and first.get_seq_length() != before + len(ids):
            # a model that ran without the cache computed another model: never silently
            import transformers

            name, version = type(self.model).__name__, transformers.__version__
            raise ModelError(f"transformers {version} ran {name} without kvrepl's K/V cache: "
                             "this version of transformers is not supported")  # fmt: skip
        return out.logits[0, -1]

    def wait(self) -> None:
        """transformers' forwards are timed as they return (drafting never runs here)."""


def cache_arg(model: Any) -> str:
    """The name transformers' forward takes the cache by: `cache` in 5.2x, `past_key_values`
    before (5.17, on the GPU machines here, takes an unknown `cache` into **kwargs and runs
    without any: every step would see its own token alone)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", None)
    return list(getattr(inner, "layers", None) or [])


def _device_of(module: Any, default: torch.device) -> torch.device:
    """Where a module computes: accelerate's hook says so for a dispatched (or offloaded)
    module, else its weights' device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    p = next(module.parameters(), None)
    return p.device if p is not None else default


class FastRunner:
    """kvrepl's CPU fast path (fastmodel.FastModel) as the engine runs it."""


    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self.device, self.kv_dtype = model.device, model.kv_dtype
        self.layer_devices: list[Any] = []
        self.logits_device = model.device
        # the GPU path feeds a token from the device, queued behind the step that chose it
        self.ahead = model.feeds_ahead
        # drafted tokens are verified with every row's logits (forward(all_logits=True)), which
        # are bit-identical to token-by-token steps on batch-invariant kernels only (the CPU's,
        # the GPU's Triton ones; not the GPU path's torch ops, which pick kernels by size)
        self.drafts = bool(model.batch_invariant)

    def new_layers(self) -> list[Any]:
        return self.model.new_layers()

    def describe(self) -> str:
        return self.model.describe()

    def forward(self, ids: list[int], pc: PromptCache) -> torch.Tensor:
        return self.model.forward(ids, pc.cache.layers)

    def forward_token(self, token: torch.Tensor, pc: PromptCache) -> torch.Tensor:
        return self.model.forward_token(token, pc.cache.layers)

    def wait(self) -> None:
        """Until the device has done what was queued (a GPU's forwards run behind the host):
        what a forward's timing must include."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def runner_for(model: Any) -> HFRunner | FastRunner:
    return FastRunner(model) if isinstance(model, KernelBackend) else HFRunner(model)
