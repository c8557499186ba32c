"""Building the CPU fast path's model (fastmodel.FastModel) from a GGUF file as it is, or from a
transformers model quantized in memory (models that are not GGUF files, and tests).

Owns the GGUF tensor names of the families the fast path runs and their mapping onto layers,
including the two things transformers' GGUF loader also does: Llama's Q/K rows are put back in
transformers' order (llama.cpp permutes them for its rope), and Gemma's norms, stored as 1 + w,
are read as w. A tensor of a type the kernels do not take raises `FastPathError`.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrepl.backends import ggufinfo
from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.fastmodel import FastModel, FastPathError, Layer, check_sizes, fuse
from kvrepl.backends.cpu.quant import Packed, QuantError, pack, quantize
from kvrepl.backends.describe import (
    GGUF_FUSED,
    GGUF_NAMES,
    GGUF_PERMUTED,
    GGUF_TOP,
    Arch,
    gguf_layer_roles,
    gguf_qk_order,
    hf_weights,
    norm_weight,
)


class GGUFTensors:
    """The tensors of one GGUF file by name (memory-mapped), packed on request (their values
    read by the kernels' repack.c where `kernels` is given, else by numpy)."""

    def __init__(self, path: Path, kernels: native.Kernels | None = None) -> None:
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.kernels = kernels
        try:
            head = ggufinfo.read(memoryview(self.data))
        except ggufinfo.GGUFError as exc:
            raise FastPathError(str(exc)) from None
        self.arch = head.arch
        self.by_name = head.tensors
        self._read: list[tuple[int, int]] = []  # the byte ranges packed (and dropped) so far

    def has(self, name: str) -> bool:
        return name in self.by_name

    def packed(self, name: str) -> Packed:
        from kvrepl.backends.cpu.quant import LAYOUT

        if name not in self.by_name:
            raise FastPathError(f"the file has no tensor {name}")
        qtype, dims, off = self.by_name[name]
        k, n = int(dims[0]), int(np.prod(dims[1:]))
        if qtype not in LAYOUT:
            raise FastPathError(f"{name}: tensor type {qtype} is not supported by the fast path")
        bs, nbytes = LAYOUT[qtype]
        end = off + n * k // bs * nbytes
        try:
            return pack(self.data[off:end], qtype, n, k, self.kernels)
        except QuantError as exc:
            raise FastPathError(f"{name}: {exc}") from None
        finally:
            self._read.append((off, end))
            self._done(off, end)

    def finish(self) -> None:
        """Drop every packed range again, at the load's end: reading a tensor maps the pages
        around the one it faults in (the kernel's fault-around, 64 KB), so its neighbours'
        dropped pages came back, about 7 MB of the embedded model's file."""
        for start, end in self._read:
            self._done(start, end)

    def _done(self, start: int, end: int) -> None:
        """The file's bytes [start, end) are read: out of this process's resident memory (the
        page cache keeps them; a later read maps them again). Without this a load held the
        whole file resident on top of the weights it was laying out."""
        mm = getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start, end = start // page * page, min(-(-end // page) * page, len(mm))
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass  # only memory

    def vector(self, name: str) -> torch.Tensor:
        """A norm or a bias (any length: a q/k norm is one head wide), as float32."""
        qtype, dims, off = self.by_name.get(name, ("", [0], 0))
        plain = {"F32": np.float32, "F16": np.float16}
        if qtype in plain:
            n = int(np.prod(dims))
            raw = self.data[off : off + n * np.dtype(plain[qtype]).itemsize]
            return torch.from_numpy(raw.view(plain[qtype]).astype(np.float32))
        return self.packed(name).dequantize().reshape(-1)

    def types(self) -> set[str]:
        return {t for t, _, _ in self.by_name.values()}


def from_gguf(path: Path, config: Any, kernels: native.Kernels, context_length: int) -> FastModel:
    """The fast model over a GGUF file's own weights."""
    return build(GGUFTensors(path, kernels), config, kernels, context_length)


def build(f: GGUFTensors, config: Any, kernels: native.Kernels, context_length: int) -> FastModel:
    """The fast model over a GGUF file's tensors, found by role under llama.cpp's names."""
    arch = Arch.from_config(config)
    check_sizes(arch)

    def norm(name: str) -> torch.Tensor:
        w = f.vector(name)  # llama.cpp stores Gemma's norms as 1 + w; transformers reads w
        return norm_weight(w - 1.0 if arch.gemma else w, arch)

    def mat(name: str, heads: int = 0) -> Packed:
        """A matrix in the kernels' layout at once (Q/K rows in transformers' order first, for
        `heads` heads), so that no more than one tensor's values are held besides the layouts:
        packing every tensor before laying any out held the whole model's values too (a 1B
        Q4_K_M file peaked at 3.1 GB)."""
        p = f.packed(name)
        if heads and f.arch in GGUF_PERMUTED:
            p = p.rows(gguf_qk_order(p.n, heads))
        return p.interleaved(kernels=kernels)

    layers = []
    for i in range(arch.n_layers):
        b = f"blk.{i}."
        got = {r: b + GGUF_NAMES[r] for r in gguf_layer_roles(arch)}
        if arch.family.fused:
            qkv = [(mat(b + GGUF_FUSED["qkv"]), 0)]
            gate_up = [(mat(b + GGUF_FUSED["gate_up"]), 0)]
        else:
            qkv = fuse([mat(got["q"], arch.n_heads), mat(got["k"], arch.n_kv), mat(got["v"])])
            gate_up = fuse([mat(got["gate"]), mat(got["up"])])
        layer = Layer(attn_norm=norm(got["attn_norm"]), qkv=qkv, o=mat(got["o"]),
                      ffn_norm=norm(got["ffn_norm"]), gate_up=gate_up,
                      down=mat(got["down"]))  # fmt: skip
        if arch.qkv_bias:
            layer.qkv_bias = torch.cat([f.vector(got[r]) for r in ("q_bias", "k_bias", "v_bias")])
        if arch.qk_norm:
            layer.q_norm, layer.k_norm = norm(got["q_norm"]), norm(got["k_norm"])
        if arch.gemma:
            layer.post_attn_norm = norm(got["post_attn_norm"])
            layer.post_ffn_norm = norm(got["post_ffn_norm"])
        layers.append(layer)
    embed = mat(GGUF_TOP["embed"])
    head = mat(GGUF_TOP["lm_head"]) if f.has(GGUF_TOP["lm_head"]) else embed
    final_norm = norm(GGUF_TOP["final_norm"])
    f.finish()
    return FastModel(config, embed, layers, final_norm, head, kernels, context_length)


def from_hf(model: Any, qtype: str, kernels: native.Kernels, context_length: int,
            kept: dict[str, Packed] | None = None) -> FastModel:  # fmt: skip
    """The fast model over a transformers model's weights, found by role (describe.hf_weights)
    and quantized to `qtype` (llama.cpp's quantizers; norms and biases stay float32). `kept`:
    weights quantized before, by name ("layers.3.q", "embed"...), used as they are when their
    shape fits; each weight quantized here is added to it."""
    arch = Arch.from_config(model.config)
    check_sizes(arch)
    top, roles = hf_weights(model, arch)
    kept = {} if kept is None else kept

    def mat(name: str, w: torch.Tensor) -> Packed:
        p = kept.get(name)
        if p is None or (p.n, p.k) != tuple(w.shape):
            p = kept[name] = quantize(w, qtype)
        return p

    layers = []
    for i, r in enumerate(roles):
        m = {role: mat(f"layers.{i}.{role}", r[role])
             for role in ("q", "k", "v", "o", "gate", "up", "down")}  # fmt: skip
        layer = Layer(
            attn_norm=norm_weight(r["attn_norm"], arch),
            qkv=fuse([m["q"], m["k"], m["v"]]),
            o=m["o"],
            ffn_norm=norm_weight(r["ffn_norm"], arch),
            gate_up=fuse([m["gate"], m["up"]]),
            down=m["down"],
        )
        if arch.qkv_bias:
            layer.qkv_bias = torch.cat([r["q_bias"], r["k_bias"], r["v_bias"]]).float()
        if arch.qk_norm:
            layer.q_norm = norm_weight(r["q_norm"], arch)
            layer.k_norm = norm_weight(r["k_norm"], arch)
        if arch.gemma:
            layer.post_attn_norm = norm_weight(r["post_attn_norm"], arch)
            layer.post_ffn_norm = norm_weight(r["post_ffn_norm"], arch)
        layers.append(layer)
    embed = mat("embed", top["embed"])
    tied = top["lm_head"].data_ptr() == top["embed"].data_ptr()
    head = embed if tied else mat("lm_head", top["lm_head"])
    final = norm_weight(top["final_norm"], arch)
    return FastModel(model.config, embed, layers, final, head, kernels, context_length)
