"""Building the CPU fast path's model (fastmodel.FastModel) from a GGUF file as it is, or from a
transformers model quantized in memory (models that are not GGUF files, and tests).

Owns the GGUF tensor names of the families the fast path runs and their mapping onto layers,
including the two things transformers' GGUF loader also does: Llama's Q/K rows are put back in
transformers' order (llama.cpp permutes them for its rope), and Gemma's norms, stored as 1 + w,
are read as w. A tensor of a type the kernels do not take raises `FastPathError`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrepl import native
from kvrepl.fastmodel import Arch, FastModel, FastPathError, Layer, check_sizes, fuse, rms_weight
from kvrepl.quant import Packed, QuantError, pack, quantize


def qk_order(rows: int, heads: int) -> np.ndarray:
    """transformers' reverse of llama.cpp's Q/K permutation, as a row order."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip


class _Reader:
    """Just enough of GGUF to find its tensors: the key/value section is skipped, not parsed
    (gguf-py's reader parses every vocabulary string: 5 s for this model)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def skip(self, vtype: int, want: bool = False) -> Any:
        if vtype == 8 and not want:
            n = self.take("<Q")
            self.pos += n
            return None
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[itype]) * count
            else:
                for _ in range(count):
                    self.skip(itype)
            return None
        return self.take(_SCALARS[vtype])


class GGUFTensors:
    """The tensors of one GGUF file by name (memory-mapped), packed on request."""

    def __init__(self, path: Path) -> None:
        from gguf import GGMLQuantizationType

        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        r = _Reader(memoryview(self.data))
        try:
            if bytes(r.buf[:4]) != b"GGUF":
                raise ValueError("not a GGUF file")
            r.pos = 4
            r.take("<I")
            n_tensors, n_kv = r.take("<Q"), r.take("<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key, vtype = r.string(), r.take("<I")
                want = key in ("general.architecture", "general.alignment")
                value = r.skip(vtype, want)
                if want:
                    meta[key] = value
            infos = []
            for _ in range(n_tensors):
                name, nd = r.string(), r.take("<I")
                dims = [r.take("<Q") for _ in range(nd)]
                infos.append((name, dims, GGMLQuantizationType(r.take("<I")).name, r.take("<Q")))
        except (ValueError, IndexError, KeyError, struct.error) as exc:
            raise FastPathError(f"cannot read the GGUF file's tensors ({exc})") from None
        align = int(meta.get("general.alignment") or 32)
        start = -(-r.pos // align) * align
        self.arch = str(meta.get("general.architecture", ""))
        self.by_name = {n: (t, dims, start + off) for n, dims, t, off in infos}

    def has(self, name: str) -> bool:
        return name in self.by_name

    def packed(self, name: str) -> Packed:
        from kvrepl.quant import LAYOUT

        if name not in self.by_name:
            raise FastPathError(f"the file has no tensor {name}")
        qtype, dims, off = self.by_name[name]
        k, n = int(dims[0]), int(np.prod(dims[1:]))
        if qtype not in LAYOUT:
            raise FastPathError(f"{name}: tensor type {qtype} is not supported by the fast path")
        bs, nbytes = LAYOUT[qtype]
        raw = self.data[off : off + n * k // bs * nbytes]
        try:
            return pack(raw, qtype, n, k)
        except QuantError as exc:
            raise FastPathError(f"{name}: {exc}") from None

    def vector(self, name: str) -> torch.Tensor:
        return self.packed(name).dequantize().reshape(-1)

    def types(self) -> set[str]:
        return {t for t, _, _ in self.by_name.values()}


def from_gguf(path: Path, config: Any, kernels: native.Kernels, context_length: int) -> FastModel:
    """The fast model over a GGUF file's own weights."""
    return build(GGUFTensors(path), config, kernels, context_length)


def build(f: GGUFTensors, config: Any, kernels: native.Kernels, context_length: int) -> FastModel:
    arch = Arch.from_config(config)
    check_sizes(arch)
    gemma = arch.family == "gemma3"

    def norm(name: str) -> torch.Tensor:
        w = f.vector(name)
        return rms_weight(w - 1.0 if gemma else w, arch.family)

    layers = []
    for i in range(arch.n_layers):
        b = f"blk.{i}."
        q, k = f.packed(b + "attn_q.weight"), f.packed(b + "attn_k.weight")
        if f.arch == "llama":
            q, k = q.rows(qk_order(q.n, arch.n_heads)), k.rows(qk_order(k.n, arch.n_kv))
        bias = None
        if f.has(b + "attn_q.bias"):
            bias = torch.cat([f.vector(b + f"attn_{x}.bias") for x in "qkv"]).contiguous()
        layer = Layer(
            attn_norm=norm(b + "attn_norm.weight"),
            qkv=fuse([q, k, f.packed(b + "attn_v.weight")]),
            o=f.packed(b + "attn_output.weight"),
            ffn_norm=norm(b + "ffn_norm.weight"),
            gate_up=fuse([f.packed(b + "ffn_gate.weight"), f.packed(b + "ffn_up.weight")]),
            down=f.packed(b + "ffn_down.weight"),
            qkv_bias=bias,
        )
        if f.has(b + "attn_q_norm.weight"):
            layer.q_norm, layer.k_norm = (
                norm(b + "attn_q_norm.weight"),
                norm(b + "attn_k_norm.weight"),
            )
        if gemma:
            layer.post_attn_norm = norm(b + "post_attention_norm.weight")
            layer.post_ffn_norm = norm(b + "post_ffw_norm.weight")
        layers.append(layer)
    embed = f.packed("token_embd.weight")
    head = f.packed("output.weight") if f.has("output.weight") else embed
    return FastModel(config, embed, layers, norm("output_norm.weight"), head, kernels,
                     context_length)  # fmt: skip


def from_hf(model: Any, qtype: str, kernels: native.Kernels, context_length: int) -> FastModel:
    """The fast model over a transformers model's weights quantized to `qtype` (llama.cpp's
    quantizers; norms and biases stay float32)."""
    config = model.config
    arch = Arch.from_config(config)
    check_sizes(arch)
    inner = model.model

    def mat(lin: Any) -> Packed:
        return quantize(lin.weight, qtype)

    layers = []
    for hl in inner.layers:
        at, mlp = hl.self_attn, hl.mlp
        bias = None
        if getattr(at.q_proj, "bias", None) is not None:
            bias = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]).detach().float()
        layer = Layer(
            attn_norm=rms_weight(hl.input_layernorm.weight, arch.family),
            qkv=fuse([mat(at.q_proj), mat(at.k_proj), mat(at.v_proj)]),
            o=mat(at.o_proj),
            ffn_norm=_ffn_norm(hl, arch.family),
            gate_up=fuse([mat(mlp.gate_proj), mat(mlp.up_proj)]),
            down=mat(mlp.down_proj),
            qkv_bias=bias.contiguous() if bias is not None else None,
        )
        if getattr(at, "q_norm", None) is not None:
            layer.q_norm = rms_weight(at.q_norm.weight, arch.family)
            layer.k_norm = rms_weight(at.k_norm.weight, arch.family)
        if arch.family == "gemma3":
            layer.post_attn_norm = rms_weight(hl.post_attention_layernorm.weight, arch.family)
            layer.post_ffn_norm = rms_weight(hl.post_feedforward_layernorm.weight, arch.family)
        layers.append(layer)
    embed = quantize(inner.embed_tokens.weight, qtype)
    tied = model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
    head = embed if tied else quantize(model.lm_head.weight, qtype)
    final = rms_weight(inner.norm.weight, arch.family)
    return FastModel(config, embed, layers, final, head, kernels, context_length)


def _ffn_norm(hl: Any, family: str) -> torch.Tensor:
    """The norm before the feed-forward block: Gemma calls it pre_feedforward_layernorm."""
    if family == "gemma3":
        return rms_weight(hl.pre_feedforward_layernorm.weight, family)
    return rms_weight(hl.post_attention_layernorm.weight, family)


def load_fast(source: Any, folder: Path, chat_template: str | None) -> Any:
    """A GGUF file on the CPU fast path, as a models.LoadedModel. ModelError("fast path off:
    ...") when it cannot run (no compiler, a tensor type or architecture it does not take)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from kvrepl import models
    from kvrepl.errors import ModelError

    try:
        kernels = native.kernels(models.cache_dir())
        tensors = GGUFTensors(source.path)
    except (native.NativeError, FastPathError) as exc:
        raise ModelError(f"fast path off: {exc}") from None
    try:
        config = AutoConfig.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder}: {exc}") from exc
    ctx = int(getattr(config, "max_position_embeddings", 0) or 4096)
    try:
        model = build(tensors, config, kernels, ctx)
    except FastPathError as exc:
        raise ModelError(f"fast path off: {exc}") from None
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    notes = models.settle_template(tokenizer, config, chat_template)
    model.weight_types = "+".join(sorted(tensors.types() - {"F32"}))
    mode = f"gguf/{kernels.label}/float16-kv"
    fp = models.fingerprint(source.label, config, mode, tokenizer, model.weights_digest())
    return models.LoadedModel(model, tokenizer, source, "cpu", "gguf", fp, ctx, notes)
