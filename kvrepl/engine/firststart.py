"""A model's one-time work, kept in the user's cache folder: a GGUF file's config and tokenizer
as a small folder (the CPU fast path), or the whole file dequantized into a safetensors model
folder (transformers and the GPU), each made once, under a temporary name, then renamed into
place; the notice a first start shows for it; the check that a .gguf file is whole before any
of it is announced. A `source` here is models.py's ModelSource (its kind and path)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platformdirs

from kvrepl.engine.devices import pick_device
from kvrepl.errors import ModelError

# Bumped when the conversion below changes, so a stale converted folder is rebuilt.
CONVERSION_VERSION = "1"


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept: KVREPL_CACHE, else the user's cache folder
    (platformdirs: ~/.cache/kvrepl on Linux, as before, and each OS's own place elsewhere)."""
    env = os.environ.get("KVREPL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("kvrepl", False))

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


def uses_fast_path(source: Any, dtype: str, device: str | None) -> bool:
    """Whether `load` tries the CPU fast path: a GGUF file, on the CPU, dtype auto or gguf."""
    return source.kind == "gguf" and dtype in ("auto", "gguf") and pick_device(device) == "cpu"


def first_start(source: Any, dtype: str, device: str | None) -> str | None:
    """The one-time work a first start with this model does, as a notice, or None."""
    if source.kind != "gguf":
        return None
    if uses_fast_path(source, dtype, device):
        if (meta_folder(source.path) / "config.json").is_file():
            return None
        return "first start with this model: reading its tokenizer once (about 8 s)…"
    if is_converted(source.path):
        return None
    return "first start with this model: dequantizing it once (about 20 s)…"


def prepare(source: Any, dtype: str, device: str | None, progress: bool = True) -> Path:
    """Do a first start's one-time work now (`load` does it too, when it was not done)."""
    if uses_fast_path(source, dtype, device):
        return prepare_meta(source.path)
    return convert_gguf(source.path, progress) if source.kind == "gguf" else source.path


def prepare_meta(gguf: Path) -> Path:
    """The GGUF file's config, generation config and tokenizer as a small folder, made once."""
    target = meta_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config, tokenizer = _from_gguf(gguf, False, "read", AutoConfig, AutoTokenizer)

    def write(tmp: Path) -> None:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _publish(target, write, gguf)


def _from_gguf(gguf: Path, progress: bool, verb: str, *classes: Any) -> list[Any]:
    """Each transformers class's object made from the GGUF file, in order; a ModelError in one
    line where transformers cannot."""
    try:
        with progress_bars(progress), metadata_read_once():
            return [c.from_pretrained(str(gguf.parent), gguf_file=gguf.name) for c in classes]
    except Exception as exc:
        raise ModelError(f"cannot {verb} GGUF file {gguf}: {exc}") from exc


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

    tokenizer, model = _from_gguf(gguf, progress, "load", AutoTokenizer, AutoModelForCausalLM)
    # The GGUF quantizer refuses to serialize; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _publish(target, write, gguf)


_READ_ONCE = threading.Lock()  # one patched region at a time (the patch is process-wide)


@contextmanager
def metadata_read_once() -> Iterator[None]:
    """Within: transformers reads a GGUF file's metadata once, however many of its classes
    ask. Its config and its tokenizer each parse the whole file with gguf-py, which takes
    about 20 s on a vocabulary of 262k tokens (Gemma 3's; measured on 2 cores); later reads
    get a copy of the first (the callers may change what they get). transformers 5.17 imports
    the reader into its modules at their top, later versions call it from its own module:
    every module that holds it gets the wrapper, and then the reader back."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    read = gguf_utils.load_gguf_checkpoint
    kept: dict[str, Any] = {}

    def once(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("return_tensors") or set(kwargs) - {"return_tensors"}:
            return read(path, *args, **kwargs)  # the weights, or a way this does not know
        key = os.fspath(path)
        if key not in kept:
            kept[key] = read(path, return_tensors=False)
        return copy.deepcopy(kept[key])

    def swap(old: Any, new: Any) -> None:  # (a module imported within took the wrapper too)
        for module in list(sys.modules.values()):  # (their own names: no lazy __getattr__)
            if getattr(module, "__dict__", {}).get("load_gguf_checkpoint") is old:
                module.load_gguf_checkpoint = new

    with _READ_ONCE:
        swap(read, once)
        try:
            yield
        finally:
            swap(once, read)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def check_gguf(source: Any) -> None:
    """ModelError in one line when a .gguf file is not a whole GGUF file (before any one-time
    work is announced for it)."""
    from kvrepl.backends import ggufinfo

    if source.kind != "gguf":
        return
    try:
        ggufinfo.check(source.path)
    except ggufinfo.GGUFError as exc:
        raise ModelError(f"{source.path.name}: {exc}") from None
    except OSError as exc:
        raise ModelError(f"{source.path.name} cannot be read: {exc.strerror}") from None
