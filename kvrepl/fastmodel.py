"""The CPU fast path: a decoder that runs a model's quantized weights as they are in the file,
with kvrepl's own kernels (native/), float32 activations and a float16 K/V cache.

Owns: the layer loop of the decoder families it knows (Llama, Mistral, Qwen2, Qwen3, Gemma 3
text), built from a transformers config and `Packed` weights; its cache layers (float16, every
layer full length and croppable: sliding-window layers attend within their window by position);
its buffers. Every kernel computes each row independently of how many rows run with it, so a
token's K/V and logits are bit-identical in a prefill chunk of any size and in a decode step.
Never tokenizes, never samples, never touches the prompt cache's ids (the engine does).
"""

from __future__ import annotations

import ctypes
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrepl import native
from kvrepl.cache import GrowingLayer
from kvrepl.quant import Packed

FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


class FastPathError(Exception):
    """A model the fast path does not run; the message says why in one line."""


@dataclass
class Arch:
    """What the layer loop needs from a transformers config."""

    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    eps: float
    act: int
    attn_scale: float
    windows: list[int]  # per layer: 0 = full attention, else the sliding window
    layer_types: list[str]
    rope_dim: int
    embed_scale: float = 1.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> Arch:
        cfg = config.get_text_config(decoder=True)
        family = FAMILIES.get(cfg.model_type)
        if family is None:
            raise FastPathError(f"architecture {cfg.model_type!r} is not one it runs")
        n_layers = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)[:n_layers]
        window = getattr(cfg, "sliding_window", None) or 0
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
        if act not in native.ACT:
            raise FastPathError(f"activation {act!r} is not one it runs")
        if getattr(cfg, "attention_bias", False) and cfg.model_type != "qwen2":
            raise FastPathError("attention biases are only run for Qwen2")
        if family == "gemma3":
            scale, embed = cfg.query_pre_attn_scalar**-0.5, cfg.hidden_size**0.5
        else:
            scale, embed = head_dim**-0.5, 1.0
        rope_dim = int(head_dim * (getattr(cfg, "partial_rotary_factor", None) or 1.0))
        return cls(
            family=family,
            n_layers=n_layers,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            ffn=cfg.intermediate_size,
            eps=float(cfg.rms_norm_eps),
            act=native.ACT[act],
            attn_scale=float(scale),
            windows=[window if t == "sliding_attention" else 0 for t in types],
            layer_types=types,
            rope_dim=rope_dim,
            embed_scale=float(embed),
            attn_softcap=float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
            final_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
        )


@dataclass
class Layer:
    """One decoder layer's weights. `qkv` and `gate_up` are lists of (Packed, column offset): one
    fused matrix when the parts share a format, else one matrix per part."""

    attn_norm: torch.Tensor
    qkv: list[tuple[Packed, int]]
    o: Packed
    ffn_norm: torch.Tensor
    gate_up: list[tuple[Packed, int]]
    down: Packed
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    descs: dict[str, Any] = field(default_factory=dict)


def fuse(parts: list[Packed]) -> list[tuple[Packed, int]]:
    """Matrices that write side by side into one output row: fused when they share a format."""
    first = parts[0]
    if all(p.fmt == first.fmt and p.block == first.block and p.k == first.k for p in parts):
        q = torch.cat([p.q for p in parts])
        sc = torch.cat([p.sc for p in parts]) if first.sc is not None else None
        return [(Packed(first.fmt, q, sc, q.shape[0], first.k, first.block), 0)]
    out, col = [], 0
    for p in parts:
        out.append((p, col))
        col += p.n
    return out


class RopeTable:
    """cos/sin [positions, rope_dim] per layer type, from the model's own rotary embedding,
    computed in fixed blocks of positions as they are first needed, so a position's values never
    depend on which positions were computed with it."""

    BLOCK = 1024

    def __init__(self, config: Any) -> None:
        import importlib

        cfg = config.get_text_config(decoder=True)
        name = {"gemma3_text": "gemma3"}.get(cfg.model_type, cfg.model_type)
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
        self.rotary = cls(cfg)
        self.takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.kinds = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.n = 0

    def upto(self, n: int) -> None:
        """Make sure positions [0, n) are in the tables."""
        if n <= self.n:
            return
        end = -(-n // self.BLOCK) * self.BLOCK
        x = torch.zeros(1, dtype=torch.float32)
        for kind in self.kinds:
            parts = [self.tables[kind]] if kind in self.tables else []
            for b in range(self.n, end, self.BLOCK):
                pos = torch.arange(b, b + self.BLOCK).unsqueeze(0)
                with torch.no_grad():
                    cos, sin = self.rotary(x, pos, kind) if self.takes_type else self.rotary(x, pos)
                parts.append((cos[0].float(), sin[0].float()))
            self.tables[kind] = (
                torch.cat([p[0] for p in parts]).contiguous(),
                torch.cat([p[1] for p in parts]).contiguous(),
            )
        self.n = end


class FastModel:
    """A decoder over Packed weights. `forward(ids, layers)` appends the ids' K/V to the cache
    layers and returns the last position's logits (float32)."""

    is_fast = True
    kv_dtype = torch.float16

    def __init__(
        self,
        config: Any,
        embed: Packed,
        layers: list[Layer],
        final_norm: torch.Tensor,
        lm_head: Packed,
        kernels: native.Kernels,
        context_length: int,
    ) -> None:
        self.config = config
        self.arch = a = Arch.from_config(config)
        self.embed, self.layers, self.final_norm, self.lm_head = embed, layers, final_norm, lm_head
        self.k = kernels
        self.context_length = context_length
        self.device = torch.device("cpu")
        self.rope = RopeTable(config)
        self.qkv_width = (a.n_heads + 2 * a.n_kv) * a.head_dim
        self._descs: dict[int, Any] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._rows = 0
        if a.n_heads // a.n_kv > 16 or a.head_dim > 512 or a.head_dim % 8 or a.ffn % 8:
            raise FastPathError("head or feed-forward sizes outside what the kernels take")

    # -- buffers and descriptors ------------------------------------------------------------
    def _desc(self, p: Packed) -> Any:
        d = self._descs.get(id(p))
        if d is None:
            d = self._descs[id(p)] = ctypes.pointer(
                native.weight(p.fmt, p.q, p.sc, p.n, p.k, p.block)
            )
        return d

    def _buffers(self, rows: int) -> dict[str, torch.Tensor]:
        if rows > self._rows:
            a = self.arch
            sizes = {
                "x": a.hidden,
                "h": a.hidden,
                "qkv": self.qkv_width,
                "att": a.n_heads * a.head_dim,
                "gu": 2 * a.ffn,
                "act": a.ffn,
            }
            self._buf = {k: torch.empty(rows, n) for k, n in sizes.items()}
            self._buf["logits"] = torch.empty(1, self.lm_head.n)
            self._rows = rows
        return self._buf

    def _scratch(self, rows: int, ctx: int) -> torch.Tensor:
        a = self.arch
        per_row = self.k.attention_scratch(1, a.n_heads, a.head_dim, ctx)
        want = max(per_row, min(rows * per_row, 1 << 20))  # up to 4 MiB: rows go in batches
        buf = self._buf.get("scratch")
        if buf is None or buf.numel() < want:
            buf = self._buf["scratch"] = torch.empty(want)
        return buf

    def new_layers(self) -> list[GrowingLayer]:
        a = self.arch
        layers = []
        for _ in range(a.n_layers):
            layer = GrowingLayer()
            empty = torch.empty(1, a.n_kv, 0, a.head_dim, dtype=self.kv_dtype)
            layer.lazy_initialization(empty, empty)
            layers.append(layer)
        return layers

    # -- the forward ------------------------------------------------------------------------
    def _mm(
        self,
        x: torch.Tensor,
        rows: int,
        parts: list[tuple[Packed, int]],
        out: torch.Tensor,
        bias: torch.Tensor | None = None,
        accumulate: int = 0,
    ) -> None:
        ldx, ldo, optr = x.shape[1], out.shape[1], out.data_ptr()
        for p, col in parts:
            b = bias[col:].data_ptr() if bias is not None else None
            self.k.matmul(
                x.data_ptr(), rows, ldx, self._desc(p), optr + 4 * col, ldo, b, accumulate
            )

    def _norm(
        self,
        x: torch.Tensor,
        rows: int,
        w: torch.Tensor,
        out: torch.Tensor,
        accumulate: int = 0,
        heads: int = 1,
        n: int | None = None,
        off: int = 0,
    ) -> None:
        n = n or x.shape[1]
        xp, op = x.data_ptr() + 4 * off, out.data_ptr() + 4 * off
        eps = self.arch.eps
        self.k.rmsnorm(
            xp, rows, x.shape[1], heads, n, w.data_ptr(), eps, op, out.shape[1], accumulate
        )

    @torch.inference_mode()
    def forward(self, ids: list[int], layers: list[GrowingLayer]) -> torch.Tensor:
        a = self.arch
        m, pos0 = len(ids), layers[0].get_seq_length()
        if pos0 + m > self.context_length:
            raise ValueError("past the model's context")
        b = self._buffers(m)
        self.rope.upto(pos0 + m)
        x = b["x"]
        rows = torch.tensor(ids, dtype=torch.int64)
        self.k.rows(
            self._desc(self.embed), rows.data_ptr(), m, x.data_ptr(), a.hidden, a.embed_scale
        )
        scratch = self._scratch(m, pos0 + m)
        for i, (lw, cache) in enumerate(zip(self.layers, layers, strict=True)):
            self._attention(i, lw, cache, m, pos0, b, scratch)
            self._feed_forward(lw, m, b)
        h = b["h"]
        self._norm(x[m - 1 : m], 1, self.final_norm, h)
        logits = b["logits"]
        self._mm(h, 1, [(self.lm_head, 0)], logits)
        out = logits[0].clone()
        if a.final_softcap:
            out = torch.tanh(out / a.final_softcap) * a.final_softcap
        return out

    def _attention(
        self,
        i: int,
        lw: Layer,
        cache: GrowingLayer,
        m: int,
        pos0: int,
        b: dict[str, torch.Tensor],
        scratch: torch.Tensor,
    ) -> None:
        """x += attention block of layer i (its K/V written into `cache` at pos0..)."""
        a, k = self.arch, self.k
        x, h, qkv, att = b["x"], b["h"], b["qkv"], b["att"]
        qw, kw, width = a.n_heads * a.head_dim, a.n_kv * a.head_dim, self.qkv_width
        self._norm(x, m, lw.attn_norm, h)
        self._mm(h, m, lw.qkv, qkv, lw.qkv_bias)
        if lw.q_norm is not None:
            self._norm(qkv, m, lw.q_norm, qkv, heads=a.n_heads, n=a.head_dim)
            self._norm(qkv, m, lw.k_norm, qkv, heads=a.n_kv, n=a.head_dim, off=qw)
        cos, sin = self.rope.tables[a.layer_types[i]]
        base, cp, sp = qkv.data_ptr(), cos.data_ptr(), sin.data_ptr()
        k.rope(base, m, width, a.n_heads, a.head_dim, a.rope_dim, cp, sp, pos0)
        k.rope(base + 4 * qw, m, width, a.n_kv, a.head_dim, a.rope_dim, cp, sp, pos0)
        kc, vc = cache.room(pos0 + m)
        kp, vp, cap = kc.data_ptr(), vc.data_ptr(), kc.shape[2]
        k.store(
            base + 4 * qw, base + 4 * (qw + kw), m, width, a.n_kv, a.head_dim, kp, vp, cap, pos0
        )
        k.attention(
            base, m, width, a.n_heads, a.n_kv, a.head_dim, kp, vp, cap, pos0, a.windows[i],
            a.attn_scale, a.attn_softcap, att.data_ptr(), att.shape[1], scratch.data_ptr(),
            scratch.numel(),
        )  # fmt: skip
        cache.advance(pos0 + m)
        if lw.post_attn_norm is not None:
            self._mm(att, m, [(lw.o, 0)], h)
            self._norm(h, m, lw.post_attn_norm, x, accumulate=1)
        else:
            self._mm(att, m, [(lw.o, 0)], x, accumulate=1)

    def _feed_forward(self, lw: Layer, m: int, b: dict[str, torch.Tensor]) -> None:
        """x += feed-forward block."""
        a = self.arch
        x, h, gu, act = b["x"], b["h"], b["gu"], b["act"]
        self._norm(x, m, lw.ffn_norm, h)
        self._mm(h, m, lw.gate_up, gu)
        self.k.act_mul(gu.data_ptr(), m, gu.shape[1], a.ffn, a.act, act.data_ptr(), act.shape[1])
        if lw.post_ffn_norm is not None:
            self._mm(act, m, [(lw.down, 0)], h)
            self._norm(h, m, lw.post_ffn_norm, x, accumulate=1)
        else:
            self._mm(act, m, [(lw.down, 0)], x, accumulate=1)

    def weights_digest(self) -> str:
        """A hash of a sample of every packed weight (for the fingerprint)."""
        import hashlib

        h = hashlib.sha256()
        mats = [self.embed, self.lm_head] + [p for lw in self.layers for p, _ in lw.qkv]
        for p in mats:
            flat = p.q.reshape(-1)
            h.update(
                flat[:: max(1, flat.numel() // 256)][:256].contiguous().view(torch.uint8).numpy()
            )
        return h.hexdigest()

    def nbytes(self) -> int:
        mats = [self.embed] + ([] if self.lm_head is self.embed else [self.lm_head])
        for lw in self.layers:
            mats += [p for p, _ in lw.qkv] + [lw.o, lw.down] + [p for p, _ in lw.gate_up]
        return sum(p.nbytes() for p in mats)


def rms_weight(w: torch.Tensor, family: str) -> torch.Tensor:
    """A norm weight as the layer loop multiplies by it: Gemma's norms scale by (1 + w)."""
    w = w.detach().float()
    return (1.0 + w).contiguous() if family == "gemma3" else w.contiguous()


def check_sizes(arch: Arch) -> None:
    if arch.hidden % 32 or arch.ffn % 32 or (arch.n_heads * arch.head_dim) % 32:
        raise FastPathError("layer sizes are not multiples of 32")
    if not math.isfinite(arch.attn_scale):
        raise FastPathError("no attention scale")
