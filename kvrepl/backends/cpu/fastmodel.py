"""The CPU fast path: a decoder that runs a model's quantized weights as they are in the file,
with kvrepl's own kernels (native/), float32 activations and a float16 K/V cache (or, with
kv_bits 8, int8 values and a float32 scale per position and kv head, quantized once as a position
is written).

Owns: the layer loop of every decoder family describe.py describes (Llama, Mistral, Qwen2,
Qwen3, Gemma 2 and 3, Phi-3), built from a transformers config and `Packed` weights; its cache
layers (float16 or 8-bit, every layer full length and croppable: sliding-window layers attend
within their window by position); its buffers. Every kernel computes each row independently of
how many rows run with it, so a token's K/V and logits are bit-identical in a prefill chunk of
any size and in a decode step.
Never tokenizes, never samples, never touches the prompt cache's ids (the engine does).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.lanes import GROUP
from kvrepl.backends.cpu.quant import Packed
from kvrepl.backends.describe import Arch, RopeTable, Unsupported
from kvrepl.backends.layers import GrowingLayer
from kvrepl.backends.protocol import KernelBackend

# What the fast path computes beyond a plain Llama layer (describe.Arch.terms).
COMPUTES = {"q/k/v biases", "q/k norms", "Gemma norms", "sliding windows", "attention softcap",
            "final softcap", "partial rotary", "GELU"}  # fmt: skip
FastPathError = Unsupported  # a model (or tensor) the fast path does not run, in one line


@dataclass
class Layer:
    """One decoder layer's weights. `qkv` and `gate_up` are lists of (Packed, column offset): one
    fused matrix when the parts share a layout (`join`), else one matrix per part."""

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
    """Matrices that write side by side into one output row, each with its column offset: `join`
    fuses them once each is in the kernels' layout, where they share one."""
    out, col = [], 0
    for p in parts:
        out.append((p, col))
        col += p.n
    return out


def join(parts: list[tuple[Packed, int]]) -> list[tuple[Packed, int]]:
    """Parts in the kernels' layout, fused into one matrix where they share it (format, scales'
    type and shape, mins) and every part but the last fills its groups of 16 rows (float
    weights: rows as they are); else as they are. Each part's layout is chosen on its own: an
    IQ4_XS file's q and k (4-bit indices) and its Q5_K v (5 bits, mins) would share only the
    bytes' layout, twice their size, if joined before it is chosen."""
    ps = [p for p, _ in parts]
    first = ps[0]

    def key(p: Packed) -> tuple:
        dd = None if p.dd is None else (p.dd.dtype, p.dd.shape[1:])
        sc = None if p.sc is None else (p.sc.dtype, p.sc.shape[1:])
        return p.fmt, p.block, p.k, p.group, p.mins, sc, dd

    grouped = first.group == GROUP
    if len(ps) == 1 or any(key(p) != key(first) for p in ps) or (
        grouped and any(p.n % GROUP for p in ps[:-1])
    ) or (not grouped and first.sc is not None):  # fmt: skip
        return parts
    q = torch.cat([p.q for p in ps])
    sc = torch.cat([p.sc for p in ps]) if first.sc is not None else None
    dd = torch.cat([p.dd for p in ps]) if first.dd is not None else None
    n = sum(p.n for p in ps)
    return [(Packed(first.fmt, q, sc, n, first.k, first.block, first.group, dd=dd,
                    mins=first.mins), 0)]  # fmt: skip


class FastModel(KernelBackend):
    """A decoder over Packed weights. `forward(ids, layers)` appends the ids' K/V to the cache
    layers and returns the last position's logits (float32)."""

    kv_bits = 16  # 8: K/V rows of int8 values and a scale (kv_bits setting; set before use)
    weight_types = "quantized"  # the loader names them (the GGUF file's types, or the conversion)

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
        a.refusal("the CPU fast path", COMPUTES)
        check_sizes(a)
        def lay(p: Packed) -> Packed:  # the kernels' layout: groups of 16 rows, a row a lane
            return p.interleaved(kernels=kernels)

        for lw in layers:
            lw.qkv = join([(lay(p), col) for p, col in lw.qkv])
            lw.gate_up = join([(lay(p), col) for p, col in lw.gate_up])
            lw.o, lw.down = lay(lw.o), lay(lw.down)
        tied = lm_head is embed
        embed = lay(embed)
        lm_head = embed if tied else lay(lm_head)
        self.embed, self.layers, self.final_norm, self.lm_head = embed, layers, final_norm, lm_head
        self.k = kernels
        self.context_length = context_length
        self.device = torch.device("cpu")
        self.rope = RopeTable(config)
        self.qkv_width = (a.n_heads + 2 * a.n_kv) * a.head_dim
        self._descs: dict[int, Any] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._rows = 0
        self._gen = 0  # counts new buffers and C models: what the C model points at moved
        self._bound: tuple[Any, ...] = ()  # what the C model was last pointed at (`_bind`)
        self._room = 0  # positions every bound cache layer has room for
        if a.n_heads // a.n_kv > 16 or a.head_dim > 512 or a.head_dim % 8 or a.ffn % 8:
            raise FastPathError("head or feed-forward sizes outside what the kernels take")

    # -- buffers and descriptors ------------------------------------------------------------
    def _desc(self, p: Packed) -> Any:
        d = self._descs.get(id(p))
        if d is None:
            d = self._descs[id(p)] = ctypes.pointer(
                native.weight(p.fmt, p.q, p.sc, p.n, p.k, p.block, p.group, p.dd, p.mins)
            )
        return d

    def _buffers(self, rows: int, logit_rows: int = 1) -> dict[str, torch.Tensor]:
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
            self._buf["ids"] = torch.empty(rows, dtype=torch.int64)
            self._rows = rows
            self._gen += 1
        if logit_rows > self._buf["logits"].shape[0]:
            self._buf["logits"] = torch.empty(logit_rows, self.lm_head.n)
            self._gen += 1
        return self._buf

    def _scratch(self, rows: int, ctx: int) -> torch.Tensor:
        a = self.arch
        per_row = self.k.attention_scratch(1, a.n_heads, a.head_dim, ctx)
        want = max(per_row, min(rows * per_row, 1 << 20))  # up to 4 MiB: rows go in batches
        buf = self._buf.get("scratch")
        if buf is None or buf.numel() < want:
            buf = self._buf["scratch"] = torch.empty(want)
            self._gen += 1
        return buf

    @property
    def kv_dtype(self) -> torch.dtype:
        """The cache's dtype: float16, or int8 rows of head_dim values and their float32 scale's
        4 bytes (native.kv8_row), so a position's scale travels with it wherever the cache goes
        (cut, exported, saved, restored) and the two kinds never mix."""
        return torch.int8 if self.kv_bits == 8 else torch.float16

    def new_layers(self) -> list[GrowingLayer]:
        a = self.arch
        layers = []
        width = native.kv8_row(a.head_dim) if self.kv_bits == 8 else a.head_dim
        for _ in range(a.n_layers):
            layer = GrowingLayer()
            empty = torch.empty(1, a.n_kv, 0, width, dtype=self.kv_dtype)
            layer.lazy_initialization(empty, empty)
            layers.append(layer)
        return layers

    # -- the forward ------------------------------------------------------------------------
    def _c_model(self) -> native.Model:
        """The kernels' view of this model (sizes, weights, norms), made once; buffers, caches
        and rope tables are pointed at before each forward."""
        if getattr(self, "_cm", None) is not None:
            return self._cm
        a = self.arch
        ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        c_layers = (native.Layer * a.n_layers)()
        for cl, lw, window in zip(c_layers, self.layers, a.windows, strict=True):
            for name in ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm",
                         "k_norm"):  # fmt: skip
                setattr(cl, name, ptr(getattr(lw, name)))
            cl.bias = ptr(lw.qkv_bias)
            cl.n_qkv, cl.n_gu = len(lw.qkv), len(lw.gate_up)
            for i, (p, col) in enumerate(lw.qkv):
                cl.qkv[i], cl.qkv_col[i] = self._desc(p).contents, col
            for i, (p, col) in enumerate(lw.gate_up):
                cl.gate_up[i], cl.gu_col[i] = self._desc(p).contents, col
            cl.o, cl.down, cl.window = (
                self._desc(lw.o).contents,
                self._desc(lw.down).contents,
                window,
            )
        self._cm = native.Model(
            a.n_layers, a.hidden, a.n_heads, a.n_kv, a.head_dim, a.ffn, a.rope_dim,
            native.ACT[a.act], int(self.kv_bits == 8),
            a.eps, a.attn_scale, a.attn_softcap, a.embed_scale, self._desc(self.embed),
            self._desc(self.lm_head), self.final_norm.data_ptr(), c_layers,
        )  # fmt: skip
        self._c_layers = c_layers
        self._gen += 1
        return self._cm

    def forward(
        self, ids: list[int], layers: list[GrowingLayer], all_logits: bool = False
    ) -> torch.Tensor:
        """Append the ids' K/V to the cache layers; the last position's logits. The layers'
        lengths move only once every layer has run, all together. `all_logits`: every
        position's logits, [len(ids), vocab], row i as a forward of the ids up to i would give
        it (the drafts' verification, engine.py); a view of a buffer the next forward reuses."""
        a = self.arch
        m, pos0 = len(ids), layers[0].get_seq_length()
        if pos0 + m > self.context_length:
            raise ValueError("past the model's context")
        cm = self._c_model()
        b = self._buffers(m, m if all_logits else 1)
        self.rope.upto(pos0 + m)
        self._scratch(m, pos0 + m)
        if self._binding(layers) != self._bound or pos0 + m > self._room:
            self._bind(cm, b, layers, pos0 + m)
            self._bound = self._binding(layers)  # after: binding may grow a layer (moves)
        rows, cref = b["ids"], ctypes.byref(cm)
        rows.numpy()[:m] = ids
        # A decode step or a verification of drafted tokens (up to 32 rows: a few steps' time)
        # in one call; a prefill chunk a layer at a time, so that Ctrl-C (which waits for the
        # call it arrives in) stops it within a layer.
        steps = [(0, a.n_layers)] if m <= 32 else [(i, i + 1) for i in range(a.n_layers)]
        for l0, l1 in steps:
            self.k.forward(cref, rows.data_ptr(), m, pos0, l0, l1, m if all_logits else 1)
        for cache in layers:
            cache.advance(pos0 + m)
        if all_logits:  # a view: the next forward writes over it
            out = b["logits"][:m]
            if a.final_softcap:  # the buffer may be an inference tensor (the engine's)
                with torch.inference_mode():
                    for row in out:  # the same elementwise calls as below
                        row.copy_(torch.tanh(row / a.final_softcap) * a.final_softcap)
            return out
        # a copy by numpy: torch's clone of a vocabulary's row runs on its OpenMP threads, whose
        # wake-up took 80-200 us a decode step (3-5%) where a copy on this thread takes ~20
        out = torch.from_numpy(b["logits"][0].numpy().copy())
        if a.final_softcap:
            out = torch.tanh(out / a.final_softcap) * a.final_softcap
        return out

    def _binding(self, layers: list[GrowingLayer]) -> tuple[Any, ...]:
        """What the C model's pointers depend on, as a value that changes when one may move."""
        return (self._gen, self.rope.n, GrowingLayer.moves, *map(id, layers))

    def _bind(self, cm: native.Model, b: dict[str, torch.Tensor], layers: list[GrowingLayer],
              need: int) -> None:  # fmt: skip
        """Point the C model at the buffers, the cache layers (with room for `need` positions)
        and the rope tables. A forward rebinds only when one of them may have moved: new
        buffers, a new C model, longer rope tables, any cache layer's buffers (re)made
        (GrowingLayer.moves), other layers, or more positions than every layer has room for."""
        scratch = b["scratch"]
        for name in ("x", "h", "qkv", "att", "gu", "logits"):
            setattr(cm, name, b[name].data_ptr())
        cm.act_buf, cm.scratch, cm.scratch_floats = (
            b["act"].data_ptr(),
            scratch.data_ptr(),
            scratch.numel(),
        )
        for cl, cache, kind in zip(self._c_layers, layers, self.arch.layer_types, strict=True):
            kc, vc = cache.room(need)
            cl.kc, cl.vc, cl.cap = kc.data_ptr(), vc.data_ptr(), kc.shape[2]
            cos, sin = self.rope.table(kind)
            cl.cos_t, cl.sin_t = cos.data_ptr(), sin.data_ptr()
        self._room = min(cl.cap for cl in self._c_layers)

    def describe(self) -> str:
        """How this model computes, for /stats."""
        kv = "float16 K/V"
        if self.kv_bits == 8:
            kv = "8-bit K/V (int8, a scale per position and kv head)"
        return f"{self.weight_types} weights, {self.k.label}, {kv}"

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


def check_sizes(arch: Arch) -> None:
    """Refuse sizes the kernels do not tile."""
    if arch.hidden % 32 or arch.ffn % 32 or (arch.n_heads * arch.head_dim) % 32:
        raise FastPathError("layer sizes are not multiples of 32")
    if not math.isfinite(arch.attn_scale):
        raise FastPathError("no attention scale")
