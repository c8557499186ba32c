"""Placement: which backend computes a model, and in how much memory. Given a config (and a
GGUF file's tensors or a transformers model), it builds kvrepl's CPU fast path or its GPU path,
sizes the cache for the context the user asked for, and checks that the cache fits the device
before anything is computed. A model a backend refuses comes back as the refusal's one line,
for the caller to fall back with.

Never resolves a model spec, never reads a tokenizer, never fingerprints (models.py does, and
assembles what this builds into a LoadedModel).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kvrepl.backends.describe import Arch, Unsupported, context_for
from kvrepl.errors import ModelError

# What the CPU fast path quantizes a transformers model's weights to (llama.cpp's Q8_0: 8 bits
# and a scale per 32, the format its converter's default makes); --dtype float32 keeps them.
HF_FAST_QTYPE = "Q8_0"


def context_length(config: Any, asked: int) -> tuple[int, list[str]]:
    """The tokens the cache is sized for: the `context` setting (0: the model's maximum), never
    past what the model takes; with a line when that limit cut the setting."""
    try:
        ctx, line = context_for(Arch.from_config(config), asked)
    except Unsupported:
        most = int(getattr(config.get_text_config(decoder=True), "max_position_embeddings", 0)
                   or 4096)  # fmt: skip
        ctx, line = (min(asked, most) if asked else most), None
    return ctx, [line] if line else []


def fast_gguf(path: Path, config: Any, kernels_dir: Path, context: int,
              kv_bits: int = 16) -> tuple[Any, str]:  # fmt: skip
    """A GGUF file's own weights on the CPU kernels, keeping K/V in `kv_bits`: (the model, the
    file's tensor types). Unsupported (no compiler, a tensor type or a term the kernels lack)
    says why."""
    from kvrepl.backends.cpu import native
    from kvrepl.backends.cpu.gguf_model import GGUFTensors, build

    try:
        kernels = native.kernels(kernels_dir)
    except native.NativeError as exc:
        raise Unsupported(str(exc)) from None
    check_memory_fits(config, context, kv_bits, weights=path.stat().st_size)
    tensors = GGUFTensors(path, kernels)
    model = build(tensors, config, kernels, context)
    model.kv_bits = kv_bits
    _trim()
    return model, "+".join(sorted(tensors.types() - {"F32"}))


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc keeps what the load's temporary
    arrays freed: a 1B Q4_K_M file's load left 0.34 GB resident and unused); elsewhere nothing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> int | None:
    """Bytes new allocations can take without swapping: Linux's MemAvailable (free memory and
    the page cache the kernel can drop), else the free pages; None where the OS does not say.
    Free pages alone undercount on any machine that has read files lately (here: 19.2 GiB free,
    23.1 available), and refused contexts that fit."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory_fits(config: Any, context: int, kv_bits: int = 16, weights: int = 0) -> None:
    """On the CPU the cache grows as the conversation does; one line, before anything is
    computed, when the `weights` (bytes still to be made: a GGUF file's layouts are about its
    size) and a full `context` of K/V (float16, or 8-bit rows with their scales) would not fit
    the memory available now: the load would otherwise swap or be killed half way."""
    try:
        arch = Arch.from_config(config)
    except Unsupported:
        return  # not one kvrepl's kernels compute
    free = available_memory()
    if free is None:
        return
    gib = 2**30
    if weights > free:
        raise ModelError(f"the model's weights need {weights / gib:.1f} GiB and "
                         f"{free / gib:.1f} GiB of memory is available")  # fmt: skip
    row = arch.head_dim + 4 if kv_bits == 8 else 2 * arch.head_dim  # a position's, per kv head
    per_token = arch.kv_bytes(1, 1) * row // arch.head_dim
    need = per_token * context
    if weights + need > free:
        fits = (free - weights) // max(1, per_token) // 1024 * 1024
        beside = f" beside the weights' {weights / gib:.1f} GiB" if weights else ""
        raise ModelError(f"a {context:,}-token context needs {need / gib:.1f} GiB of K/V{beside} "
                         f"and {free / gib:.1f} GiB of memory is available: use --context "
                         f"{fits:,} or less")  # fmt: skip


def fast_transformers(model: Any, cache: Path, context: int, folder: Path, digest: str,
                      kv_bits: int = 16) -> tuple[Any, list[str]]:  # fmt: skip
    """A transformers model's weights, quantized to HF_FAST_QTYPE, on the CPU kernels, keeping
    K/V in `kv_bits`; and the lines to show. The quantized weights are kept in `cache` and read
    from there at the next load of the same weights: the same files in `folder`, the same sample
    of them (`digest`), the same quantizer (converted_weights_file)."""
    from kvrepl.backends.cpu import native, packcache
    from kvrepl.backends.cpu.gguf_model import from_hf

    try:
        kernels = native.kernels(cache)
    except native.NativeError as exc:
        raise Unsupported(str(exc)) from None
    check_memory_fits(model.config, context, kv_bits)
    file = converted_weights_file(cache, folder, digest)
    saved, note = packcache.load(file, HF_FAST_QTYPE)
    kept = dict(saved)
    fast = from_hf(model, HF_FAST_QTYPE, kernels, context, kept)
    fast.weight_types, fast.kv_bits = f"{HF_FAST_QTYPE} (converted at load)", kv_bits
    fresh = kept.keys() - saved.keys() or any(kept[n] is not saved[n] for n in saved)
    how = "read from the cache of an earlier start"
    notes = [note] if note else []
    if fresh:
        how = "kept for the next start"
        if failed := packcache.save(file, HF_FAST_QTYPE, kept):
            notes.append(failed)
            how = "converted again at the next start"
        else:
            _drop_stale(file)
    notes.append(f"weights converted to {HF_FAST_QTYPE} at load for kvrepl's CPU kernels ({how}; "
                 "--dtype float32: transformers, unconverted)")  # fmt: skip
    return fast, notes


def converted_weights_file(cache: Path, folder: Path, digest: str) -> Path:
    """Where a model folder's weights, quantized for the CPU kernels, are kept: named after the
    folder's path, and keyed by its weight files (names, sizes, modification times), a sample of
    the weights (`digest`), the quantization type and the quantizer's version; any change to one
    of them names another file."""
    from kvrepl.backends.cpu import packcache

    stats = []
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file():
            st = p.stat()
            stats.append((p.name, st.st_size, st.st_mtime_ns))
    key = json.dumps([stats, digest, HF_FAST_QTYPE, packcache.quantizer_version()])
    return cache / "converted" / f"{_place_name(folder)}-{_sha(key)[:16]}.safetensors"


def _place_name(folder: Path) -> str:
    return f"{folder.name}-{_sha(str(folder.resolve()))[:8]}"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _drop_stale(file: Path) -> None:
    """The files kept for the same folder's earlier weights: they can never be read again."""
    place = file.name[: -len("-0123456789abcdef.safetensors")]
    for old in file.parent.glob(f"{place}-*.safetensors"):
        if old != file and len(old.name) == len(file.name):
            old.unlink(missing_ok=True)


def gpu(model: Any, context: int, gguf: Path | None = None) -> Any:
    """The model on kvrepl's Triton kernels, its cache checked against the device's free memory
    first; Unsupported when Triton is missing or the model has a term they lack (the model is
    left as it was), ModelError when the cache cannot fit. gguf: the file the model was loaded
    from, whose Q8_0/Q4_0/Q4_1/Q4_K matrices the kernels keep in their blocks (the same values,
    dequantized in the matmul as transformers' loader dequantized them; the results differ from
    bf16's in the last bits, the tensor cores taking a tile computed in registers otherwise)."""
    try:
        from kvrepl.backends.gpu.model import GpuModel, ops_for
        from kvrepl.backends.gpu.qweights import GGUFBlocks

        ops = ops_for("triton")
    except ImportError as exc:
        raise Unsupported(f"{getattr(exc, 'name', None) or exc} missing") from None
    from kvrepl.engine.engine import PREFILL_CHUNK

    arch = Arch.from_config(model.config)
    arch.refusal("the GPU kernels", ops.COMPUTES)
    g = arch.n_heads // arch.n_kv  # the attention's partials of a prefill chunk, in float32
    check_cache_fits(model, context, 4 * ops.part_floats(PREFILL_CHUNK, arch.n_kv, context, g,
                                                          arch.head_dim))  # fmt: skip
    p = next(model.parameters())
    blocks = GGUFBlocks(gguf, arch, p.device) if gguf is not None else None
    return GpuModel(model, context, consume=True, blocks=blocks)


def check_cache_fits(model: Any, context: int, scratch: int = 0) -> None:
    """One line, before anything is computed, when a `context`-token cache does not fit the free
    memory of the model's GPU (the model's weights are already there). `scratch`: bytes that
    grow with the context beside the K/V (the GPU attention's partials of a prefill chunk: 2.2
    GB at 32k positions for an 8B model, more than the GiB kept for activations)."""
    import torch

    p = next(model.parameters())
    if p.device.type != "cuda":
        return
    arch = Arch.from_config(model.config)
    need = arch.kv_bytes(context, p.element_size()) + scratch
    free, _ = torch.cuda.mem_get_info(p.device)
    room = free - (1 << 30)  # a GiB for activations, graphs and the allocator's slack
    if need > room:
        per_token = arch.kv_bytes(1, p.element_size()) + scratch / max(1, context)
        fits = int(max(0, room) // max(1.0, per_token)) // 1024 * 1024
        what = "K/V" if not scratch else "K/V and attention scratch"
        raise ModelError(
            f"a {context:,}-token context needs {need / 2**30:.1f} GiB of {what} on {p.device} "
            f"and {max(0, free) / 2**30:.1f} GiB is free: use --context {fits:,} or less"
        )


def check_weights_fit(model: Any, device: str) -> None:
    """One line when the weights alone do not fit the GPU they are about to be moved to."""
    import torch

    if not device.startswith("cuda"):
        return
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if need > free:
        raise ModelError(f"the weights need {need / 2**30:.1f} GiB on {device} and "
                         f"{free / 2**30:.1f} GiB is free")  # fmt: skip
