"""The GPU path: a decoder of any family describe.py describes, over the model's own (bf16)
weights held once, on kvrepl's batch-invariant Triton kernels (triton_ops.py), with a
fixed-capacity K/V cache whose filled length is data, so that a decode step is one CUDA graph
replay and cutting the cache back stays a length change.

Owns: the weights as the kernels take them (Q, K, V and gate/up fused), the cache layers (growing
layers reserved at the model's context length, never moved), the rope tables, the buffers, and one
captured decode graph per cache. A token's K/V and logits are bit-identical whether it was
computed in a prefill chunk of any size or in a decode step, so greedy output with reuse equals
`--no-reuse` in bf16 too. The same code runs on the CPU with plain torch ops (`backend="torch"`)
for the tests of its logic (capacity, cut, snapshot); only CUDA captures graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from kvrepl.backends.describe import Arch, RopeTable, hf_weights, norm_weight
from kvrepl.backends.layers import GrowingLayer
from kvrepl.backends.protocol import KernelBackend

# What the GPU path computes beyond a plain Llama layer (describe.Arch.terms), by kernel set:
# the Triton attention has no softcap, the torch ops (logic tests on the CPU) have everything.
COMPUTES = {"q/k/v biases", "q/k norms", "Gemma norms", "sliding windows", "final softcap",
            "partial rotary", "GELU"}  # fmt: skip


def ops_for(backend: str) -> Any:
    if backend == "triton":
        from kvrepl.backends.gpu import triton_ops

        triton_ops.COMPUTES = COMPUTES
        return triton_ops
    from kvrepl.backends.gpu.torch_ops import torch_ops

    return torch_ops(COMPUTES)


GRAPH_ROWS = 17  # verifications of up to this many rows (16 drafted tokens) replay a graph


class GpuModel(KernelBackend):
    """A decoder on the GPU kernels. `forward(ids, layers)` appends the ids' K/V to the cache
    layers and returns the last position's logits (float32)."""

    feeds_ahead = True  # forward_token: the next step is queued behind the one that chose it

    def __init__(self, model: Any, context_length: int, backend: str = "triton",
                 graphs: bool = True, consume: bool = False,
                 blocks: Any = None) -> None:  # fmt: skip
        """consume: let go of the transformers model's weights as the kernels' copies are made
        (the weights are then held once; the model cannot run after). blocks: the GGUF file's
        quantized matrices (qweights.GGUFBlocks), kept in their blocks in place of the model's
        where their type is one the kernels take (the rest stay the model's)."""
        self.config = model.config
        self.arch = a = Arch.from_config(model.config)
        self.ops = ops_for(backend)
        a.refusal("the GPU path" + (" (Triton)" if backend == "triton" else ""), self.ops.COMPUTES)
        p = next(model.parameters())
        self.device, self.kv_dtype = p.device, p.dtype
        self.backend = backend
        self.batch_invariant = backend == "triton"
        self.graphs = graphs and backend == "triton" and p.device.type == "cuda"
        self.context_length = context_length
        self.capacity = context_length  # every layer's fixed size (GrowingLayer.limit)
        self.generation_config = getattr(model, "generation_config", None)
        # Llama's layer runs the fused QKV + rotary + cache-write kernel; any other term (a
        # bias, a q/k norm, a partial rotary) runs the matmul, then those steps one by one.
        self.fused_qkv = not (a.qkv_bias or a.qk_norm or a.rope_dim != a.head_dim)
        self.quantized: dict[str, int] = {}  # GGUF type -> matrices kept in its blocks
        self.layers = self._take_weights(model, consume, blocks)
        rope = RopeTable(model.config)
        rope.upto(context_length)
        self.rope = {kind: tuple(t.to(self.device) for t in rope.table(kind))
                     for kind in set(a.layer_types)}  # fmt: skip
        self.embed_scale = torch.tensor(a.embed_scale, dtype=self.kv_dtype, device=self.device)
        self.steps = torch.arange(context_length, device=self.device)  # positions past pos0
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs: dict[int, Any] = {}

    def _take_weights(self, model: Any, consume: bool, blocks: Any) -> list[dict[str, Any]]:
        """The layers' weights as the kernels take them (q/k/v and gate/up side by side); when
        consuming, each layer's originals are let go as soon as its fused copy exists, so the
        weights are held once (plus one layer) rather than twice."""
        a = self.arch
        top, roles = hf_weights(model, a)
        self.embed, self.lm_head = top["embed"], top["lm_head"]
        self.final_norm = self._norm(top["final_norm"])
        inner_layers = _decoder_layers(model)
        layers = []
        for i, r in enumerate(roles):
            got = blocks.layer(i) if blocks is not None else {}
            lw = {"attn_norm": self._norm(r["attn_norm"]), "ffn_norm": self._norm(r["ffn_norm"])}
            mats = {"qkv": [r["q"], r["k"], r["v"]], "gate_up": [r["gate"], r["up"]],
                    "o": [r["o"]], "down": [r["down"]]}  # fmt: skip
            for name, parts in mats.items():
                lw[name] = self._matrix(got.get(name), parts)
            if a.qkv_bias:
                lw["qkv_bias"] = torch.cat([r["q_bias"], r["k_bias"], r["v_bias"]])
            for name in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
                lw[name] = self._norm(r[name]) if r[name] is not None else None
            roles[i] = None
            if consume and i < len(inner_layers):
                kept = [w for w in (lw["o"], lw["down"]) if isinstance(w, torch.Tensor)]
                _release(inner_layers[i], keep=kept)
            layers.append(lw)
        if blocks is not None:
            self.lm_head = self._matrix(blocks.lm_head(), [top["lm_head"]])
            head = model.get_output_embeddings()
            if consume and self.lm_head is not top["lm_head"] and \
                    top["lm_head"].data_ptr() != top["embed"].data_ptr():  # fmt: skip
                head.weight.data = head.weight.data.new_empty(0)
        return layers

    def _matrix(self, q: Any, parts: list[torch.Tensor]) -> Any:
        """A matrix as the kernels take it: its GGUF blocks when kept (and of the model's shape),
        else the model's weights, stacked by rows (Q, K and V; gate and up)."""
        if q is not None and tuple(q.shape) == (sum(p.shape[0] for p in parts), parts[0].shape[1]):
            self.quantized[q.qtype] = self.quantized.get(q.qtype, 0) + 1
            return q
        return _joined(parts) if len(parts) > 1 else parts[0]

    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        """A norm weight as the kernels multiply by it: Gemma's 1 + w in float32."""
        return norm_weight(w, self.arch) if self.arch.gemma else w

    def describe(self) -> str:
        """How this model computes, for /stats."""
        dt = str(self.kv_dtype).removeprefix("torch.")
        w = f"{dt} weights"
        if self.quantized:
            kept = ", ".join(f"{n} {t}" for t, n in sorted(self.quantized.items()))
            w = f"GGUF blocks ({kept} matrices; the rest {dt})"
        return f"{w} on kvrepl's {self.backend} GPU kernels ({self.device}), {dt} K/V"

    # -- cache and buffers -------------------------------------------------------------------
    def new_layers(self) -> list[GrowingLayer]:
        """Layers reserved at the whole context: their buffers never move (a graph keeps them)."""
        a = self.arch
        layers = []
        for _ in range(a.n_layers):
            layer = FixedLayer(limit=self.capacity)
            empty = torch.empty(1, a.n_kv, 0, a.head_dim, dtype=self.kv_dtype, device=self.device)
            layer.lazy_initialization(empty, empty)
            layer.room(self.capacity)
            layers.append(layer)
        return layers

    def _buffers(self, m: int) -> dict[str, torch.Tensor]:
        b = self._bufs.get(m)
        if b is None:
            a, dev, dt = self.arch, self.device, self.kv_dtype
            mk = lambda n: torch.empty(m, n, device=dev, dtype=dt)  # noqa: E731
            g = a.n_heads // a.n_kv
            part = self.ops.part_floats(m, a.n_kv, self.capacity, g, a.head_dim)
            b = {"x": mk(a.hidden), "h": mk(a.hidden),
                 "q": mk(a.n_heads * a.head_dim), "att": mk(a.n_heads * a.head_dim),
                 "act": mk(a.ffn), "qkv": mk((a.n_heads + 2 * a.n_kv) * a.head_dim),
                 "k": mk(a.n_kv * a.head_dim), "gu": mk(2 * a.ffn if a.act != "silu" else 0),
                 "logits": torch.empty(1, self.lm_head.shape[0], device=dev, dtype=dt),
                 "part": torch.empty(part, device=dev, dtype=torch.float32),
                 "ids": torch.zeros(m, dtype=torch.long, device=dev),
                 "pos": torch.zeros(1, dtype=torch.long, device=dev)}  # fmt: skip
            if m > 64:  # prefill chunks of other sizes come and go: keep few
                self._bufs = {k: v for k, v in self._bufs.items() if k <= 64}
            self._bufs[m] = b
        return b

    # -- the forward -------------------------------------------------------------------------
    def _run(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer],
             all_logits: bool = False) -> None:  # fmt: skip
        """One forward of b["ids"] at positions b["pos"][0].. (device tensors: a graph replays
        it with new values). A Llama layer is eight kernels (rotary and the cache writes ride on
        the QKV matmul, silu * up on the gate/up one); other terms add elementwise steps, which
        compute each position alone, so the step stays batch-invariant. The head computes the
        last row's logits (b["logits"]), or every row's (b["rows"]: a drafts' verification)."""
        a, ops = self.arch, self.ops
        x, h, q, att = (b[k] for k in ("x", "h", "q", "att"))
        m = x.shape[0]
        torch.index_select(self.embed, 0, b["ids"], out=x)
        if a.embed_scale != 1.0:
            x.mul_(self.embed_scale)
        for i, (lw, cache) in enumerate(zip(self.layers, layers, strict=True)):
            kc, vc = (t[0] for t in cache.room(self.capacity))
            cos, sin = self.rope[a.layer_types[i]]
            ops.rmsnorm(x, lw["attn_norm"], a.eps, h, ahead=lw["qkv"])
            if self.fused_qkv:
                ops.matmul_rope(h, lw["qkv"], q, cos, sin, kc, vc, b["pos"], a.n_heads, a.n_kv)
            else:
                self._qkv(b, lw, cos, sin, kc, vc)
            if a.attn_softcap:
                ops.attention(q, kc, vc, b["pos"], att, b["part"], a.windows[i], a.attn_scale,
                              a.attn_softcap)  # fmt: skip
            else:
                ops.attention(q, kc, vc, b["pos"], att, b["part"], a.windows[i], a.attn_scale,
                              ahead=lw["o"])  # fmt: skip
            self._residual(att, lw["o"], lw["post_attn_norm"], x, h)
            ops.rmsnorm(x, lw["ffn_norm"], a.eps, h, ahead=lw["gate_up"])
            if a.act == "silu":
                ops.matmul(h, lw["gate_up"], b["act"], glu=True)
            else:
                gu, f = b["gu"], a.ffn
                ops.matmul(h, lw["gate_up"], gu)
                gelu = torch.nn.functional.gelu(gu[:, :f].float(), approximate="tanh")
                b["act"].copy_((gelu * gu[:, f:].float()).to(gu.dtype))
            self._residual(b["act"], lw["down"], lw["post_ffn_norm"], x, h)
        if all_logits:
            ops.rmsnorm(x, self.final_norm, a.eps, h)
            ops.matmul(h, self.lm_head, b["rows"])
        else:
            ops.rmsnorm(x[m - 1 : m], self.final_norm, a.eps, h[:1], ahead=self.lm_head)
            ops.matmul(h[:1], self.lm_head, b["logits"])

    def _qkv(self, b: dict[str, torch.Tensor], lw: dict[str, Any], cos: torch.Tensor,
             sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> None:  # fmt: skip
        """Q, K and V with a bias, q/k norms or a partial rotary: the matmul, then each term,
        then K and V written into the cache at each row's position."""
        a, ops, qkv, q, k = self.arch, self.ops, b["qkv"], b["q"], b["k"]
        m, d, qw, kw = qkv.shape[0], a.head_dim, a.n_heads * a.head_dim, a.n_kv * a.head_dim
        ops.matmul(b["h"], lw["qkv"], qkv)
        if a.qkv_bias:
            qkv.add_(lw["qkv_bias"])
        q.copy_(qkv[:, :qw])
        k.copy_(qkv[:, qw : qw + kw])
        if a.qk_norm:
            ops.rmsnorm(q.view(-1, d), lw["q_norm"], a.eps, q.view(-1, d))
            ops.rmsnorm(k.view(-1, d), lw["k_norm"], a.eps, k.view(-1, d))
        positions = b["pos"] + self.steps[:m]
        c, s = cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None]
        _rotate(q.view(m, a.n_heads, d), c, s, a.rope_dim)
        _rotate(k.view(m, a.n_kv, d), c, s, a.rope_dim)
        kc.index_copy_(1, positions, k.view(m, a.n_kv, d).transpose(0, 1))
        vc.index_copy_(1, positions, qkv[:, qw + kw :].view(m, a.n_kv, d).transpose(0, 1))

    def _residual(self, y_in: torch.Tensor, w: torch.Tensor, post: torch.Tensor | None,
                  x: torch.Tensor, tmp: torch.Tensor) -> None:  # fmt: skip
        """x += y_in @ w^T, or (Gemma) x += norm(y_in @ w^T)."""
        if post is None:
            self.ops.matmul(y_in, w, x, residual=x)
            return
        self.ops.matmul(y_in, w, tmp)
        self.ops.rmsnorm(tmp, post, self.arch.eps, tmp)
        x.add_(tmp)

    @torch.inference_mode()
    def forward(self, ids: list[int], layers: list[GrowingLayer],
                all_logits: bool = False) -> torch.Tensor:  # fmt: skip
        """Append the ids' K/V to the cache layers; the last position's logits, or with
        `all_logits` every position's, [len(ids), vocab], row i bit-identical to what a forward
        of the ids up to i gives (on the batch-invariant kernels: the drafts' verification)."""
        b = self._buffers(len(ids))
        b["ids"].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        if all_logits and "rows" not in b:
            b["rows"] = torch.empty(len(ids), self.lm_head.shape[0], device=self.device,
                                    dtype=self.kv_dtype)  # fmt: skip
        return self._step(b, layers, all_logits)

    @torch.inference_mode()
    def forward_token(self, token: torch.Tensor, layers: list[GrowingLayer]) -> torch.Tensor:
        """`forward([token])` with the token a 0-d tensor on the device (the sampler's): queued
        behind the step that chose it, with no wait for its value."""
        b = self._buffers(1)
        b["ids"].copy_(token.view(1))
        return self._step(b, layers)

    def _step(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer],
              all_logits: bool = False) -> torch.Tensor:  # fmt: skip
        m, pos0 = b["ids"].shape[0], layers[0].get_seq_length()
        if pos0 + m > self.context_length:
            raise ValueError("past the model's context")
        b["pos"].fill_(pos0)
        self.warming = False
        if self.graphs and m <= (GRAPH_ROWS if all_logits else 1):
            self._graph(b, layers, all_logits).replay()
        else:
            self._run(b, layers, all_logits)
        for cache in layers:
            cache.advance(pos0 + m)
        out = b["rows"].float() if all_logits else b["logits"][0].float()
        if self.arch.final_softcap:
            out = torch.tanh(out / self.arch.final_softcap) * self.arch.final_softcap
        return out

    def _graph(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer],
               all_logits: bool = False) -> Any:  # fmt: skip
        """The decode step of this cache, or its verification of m rows (every row's logits),
        captured once (after a warm-up that compiles the kernels; its writes at the current
        positions are rewritten by the replay): a verification costs a step's launches, not
        eight kernels a layer launched one by one. The forward that captures is `warming`."""
        key = (graph_key(layers), b["ids"].shape[0], all_logits)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(b, layers, all_logits)
            self.warming = True
            if len(self._graphs) >= 4 * GRAPH_ROWS:  # caches come and go: keep a few caches'
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = g
        return g

    def _capture(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer],
                 all_logits: bool) -> Any:  # fmt: skip
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(b, layers, all_logits)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._run(b, layers, all_logits)
        return g


def graph_key(layers: list[GrowingLayer]) -> tuple[int, ...]:
    """What a captured decode step reads and writes of a cache: every layer's K and V buffer
    address (a graph replays the addresses it was captured with). Layer 0's alone is not enough:
    a cache freed and another made can reuse its first buffer's address and not the others'."""
    return tuple(p for layer in layers for p in layer.addresses())


class FixedLayer(GrowingLayer):
    """A cache layer of the GPU path: a GrowingLayer whose `keys`/`values` views are made when
    read rather than at each length change. A decode step moves every layer's length, and
    making 2 views for each of 30 layers cost about 250 us of the host's time a token, more than
    the GPU left it at 135M (the host queues the next step while the GPU runs this one)."""

    _at: tuple[torch.Tensor, tuple[int, int]] | None = None  # (the K buffer, both addresses)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[..., : self._n, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        assert value is None, "a FixedLayer's keys are its buffer's filled part"

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[..., : self._n, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        assert value is None, "a FixedLayer's values are its buffer's filled part"

    def _set_length(self, n: int) -> None:
        self._n = n

    def addresses(self) -> tuple[int, int]:
        """Where the K and V buffers are (a fixed layer's never move, so read once)."""
        k = self._k
        if self._at is None or self._at[0] is not k:
            self._at = (k, (k.data_ptr(), self._v.data_ptr()))
        return self._at[1]

    def reset(self) -> None:
        super().reset()
        self._at = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> None:
    """Rotary embedding of the first `dim` of each head in place, in halves as transformers
    does: x * cos + rotate_half(x) * sin, in float32, rounded once."""
    xr = x[..., :dim].float()
    half = dim // 2
    turned = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    x[..., :dim] = (xr * cos + turned * sin).to(x.dtype)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Matrices stacked by rows: a view when they already lie one after another (Phi-3's fused
    projections), else one copy."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    offset = first.storage_offset()
    for p in parts:
        if not p.is_contiguous() or p.untyped_storage().data_ptr() != \
                first.untyped_storage().data_ptr() or p.storage_offset() != offset:  # fmt: skip
            return torch.cat(parts).contiguous()
        offset += p.numel()
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                   (rows, first.shape[1]))  # fmt: skip


def _decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    return list(getattr(inner, "layers", None) or [])


def _release(module: Any, keep: list[torch.Tensor]) -> None:
    """Let go of a transformers layer's weights (the GPU path holds its own copies), except the
    storages in `keep`, which the GPU path uses as they are."""
    kept = {t.untyped_storage().data_ptr() for t in keep}
    for p in module.parameters():
        if p.untyped_storage().data_ptr() not in kept:
            p.data = p.data.new_empty(0)
