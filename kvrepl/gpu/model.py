"""The GPU path: a Llama-family decoder over the model's own (bf16) weights, on kvrepl's
batch-invariant Triton kernels (triton_ops.py), with a fixed-capacity K/V cache whose filled
length is data, so that a decode step is one CUDA graph replay and cutting the cache back stays a
length change.

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

from kvrepl.cache import GrowingLayer
from kvrepl.fastmodel import Arch, FastPathError, RopeTable


def _torch_ops() -> Any:
    """The kernels' contract in plain torch (no invariance promised): for CPU tests."""

    def _norm(x, w, eps, out):
        v = x.float()
        y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(out.dtype)
        return out.copy_((w.float() * y.float()).to(out.dtype))

    class Ops:
        rmsnorm = staticmethod(_norm)

        @staticmethod
        def matmul(x, w, out, residual=None, *, glu=False):
            if glu:
                f = out.shape[1]
                g, u = (x @ w[:f].T).to(out.dtype), (x @ w[f:].T).to(out.dtype)
                y = (torch.nn.functional.silu(g.float()) * u.float()).to(out.dtype)
            else:
                y = (x @ w.T).to(out.dtype)
            out.copy_(y if residual is None else (residual.float() + y.float()).to(out.dtype))
            return out

        @staticmethod
        def matmul_rope(x, w, q, cos_t, sin_t, kc, vc, pos0, heads, kv_heads):
            qkv = (x @ w.T).to(q.dtype)
            m, d = qkv.shape[0], kc.shape[2]
            p = int(pos0[0])
            c, s = cos_t[p : p + m, None, :], sin_t[p : p + m, None, :]
            qk = qkv[:, : (heads + kv_heads) * d].view(m, heads + kv_heads, d).float()
            half = d // 2
            rot = torch.cat([-qk[..., half:], qk[..., :half]], -1)
            r = (qk * c + rot * s).to(qkv.dtype)
            q.copy_(r[:, :heads].reshape(m, -1))
            kc[:, p : p + m] = r[:, heads:].transpose(0, 1)
            vc[:, p : p + m] = qkv[:, (heads + kv_heads) * d :].view(m, kv_heads, d).transpose(0, 1)
            return q

        @staticmethod
        def attention(q, kc, vc, pos0, out, part, window, scale):
            m, p0 = q.shape[0], int(pos0[0])
            kvh, _, d = kc.shape
            g = out.shape[1] // d // kvh
            for r in range(m):
                lo = max(0, p0 + r - window + 1) if window else 0
                k, v = kc[:, lo : p0 + r + 1].float(), vc[:, lo : p0 + r + 1].float()
                qr = q[r, : out.shape[1]].view(kvh, g, d).float()
                w = torch.softmax(qr @ k.transpose(1, 2) * scale, -1)
                out[r] = (w @ v).reshape(-1).to(out.dtype)
            return out

        @staticmethod
        def part_floats(rows, kv_heads, cap, g, d):
            return 1

    return Ops


def ops_for(backend: str) -> Any:
    if backend == "triton":
        from kvrepl.gpu import triton_ops

        return triton_ops
    return _torch_ops()


class GpuModel:
    """A Llama-family decoder on the GPU kernels. `forward(ids, layers)` appends the ids' K/V
    to the cache layers and returns the last position's logits (float32)."""

    is_fast = True

    def __init__(self, model: Any, context_length: int, backend: str = "triton",
                 graphs: bool = True) -> None:  # fmt: skip
        cfg = model.config.get_text_config(decoder=True)
        self.config = model.config
        self.arch = a = Arch.from_config(model.config)
        if a.family != "llama" or getattr(cfg, "attention_bias", False) or a.rope_dim != a.head_dim:
            raise FastPathError(f"the GPU path runs Llama-shaped models, not {cfg.model_type!r}")
        if getattr(cfg, "layer_types", None) and "sliding_attention" in cfg.layer_types:
            raise FastPathError("the GPU path has no sliding windows yet")
        p = next(model.parameters())
        self.device, self.kv_dtype = p.device, p.dtype
        self.ops = ops_for(backend)
        self.graphs = graphs and backend == "triton" and p.device.type == "cuda"
        self.context_length = context_length
        self.capacity = context_length  # every layer's fixed size (GrowingLayer.limit)
        self.generation_config = getattr(model, "generation_config", None)
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.layers = []
        for hl in inner.layers:
            at, mlp = hl.self_attn, hl.mlp
            self.layers.append({
                "attn_norm": hl.input_layernorm.weight.detach(),
                "qkv": torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).detach(),
                "o": at.o_proj.weight.detach(),
                "ffn_norm": hl.post_attention_layernorm.weight.detach(),
                "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                "down": mlp.down_proj.weight.detach(),
            })  # fmt: skip
        rope = RopeTable(model.config)
        rope.upto(context_length)
        cos, sin = rope.tables[a.layer_types[0]]
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs: dict[int, Any] = {}

    # -- cache and buffers -------------------------------------------------------------------
    def new_layers(self) -> list[GrowingLayer]:
        """Layers reserved at the whole context: their buffers never move (a graph keeps them)."""
        a = self.arch
        layers = []
        for _ in range(a.n_layers):
            layer = GrowingLayer(limit=self.capacity)
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
                 "act": mk(a.ffn),
                 "logits": torch.empty(1, self.lm_head.shape[0], device=dev, dtype=dt),
                 "part": torch.empty(part, device=dev, dtype=torch.float32),
                 "ids": torch.zeros(m, dtype=torch.long, device=dev),
                 "pos": torch.zeros(1, dtype=torch.long, device=dev)}  # fmt: skip
            if m > 64:  # prefill chunks of other sizes come and go: keep few
                self._bufs = {k: v for k, v in self._bufs.items() if k <= 64}
            self._bufs[m] = b
        return b

    # -- the forward -------------------------------------------------------------------------
    def _run(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer]) -> None:
        """One forward of b["ids"] at positions b["pos"][0].. (device tensors: a graph replays
        it with new values): eight kernels a layer (rotary and the cache writes ride on the
        QKV matmul, silu * up on the gate/up one)."""
        a, ops = self.arch, self.ops
        x, h, q, att, act = (b[k] for k in ("x", "h", "q", "att", "act"))
        m = x.shape[0]
        torch.index_select(self.embed, 0, b["ids"], out=x)
        for lw, cache in zip(self.layers, layers, strict=True):
            kc, vc = cache._k[0], cache._v[0]
            ops.rmsnorm(x, lw["attn_norm"], a.eps, h)
            ops.matmul_rope(h, lw["qkv"], q, self.cos, self.sin, kc, vc, b["pos"],
                            a.n_heads, a.n_kv)  # fmt: skip
            ops.attention(q, kc, vc, b["pos"], att, b["part"], 0, a.attn_scale)
            ops.matmul(att, lw["o"], x, residual=x)
            ops.rmsnorm(x, lw["ffn_norm"], a.eps, h)
            ops.matmul(h, lw["gate_up"], act, glu=True)
            ops.matmul(act, lw["down"], x, residual=x)
        ops.rmsnorm(x[m - 1 : m], self.final_norm, a.eps, h[:1])
        ops.matmul(h[:1], self.lm_head, b["logits"])

    @torch.inference_mode()
    def forward(self, ids: list[int], layers: list[GrowingLayer]) -> torch.Tensor:
        b = self._buffers(len(ids))
        b["ids"].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        return self._step(b, layers)

    @torch.inference_mode()
    def forward_token(self, token: torch.Tensor, layers: list[GrowingLayer]) -> torch.Tensor:
        """`forward([token])` with the token a 0-d tensor on the device (the sampler's): queued
        behind the step that chose it, with no wait for its value."""
        b = self._buffers(1)
        b["ids"].copy_(token.view(1))
        return self._step(b, layers)

    def _step(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer]) -> torch.Tensor:
        m, pos0 = b["ids"].shape[0], layers[0].get_seq_length()
        if pos0 + m > self.context_length:
            raise ValueError("past the model's context")
        b["pos"].fill_(pos0)
        if m == 1 and self.graphs:
            self._graph(b, layers).replay()
        else:
            self._run(b, layers)
        for cache in layers:
            cache.advance(pos0 + m)
        return b["logits"][0].float()

    def _graph(self, b: dict[str, torch.Tensor], layers: list[GrowingLayer]) -> Any:
        """The decode step of this cache, captured once (after a warm-up that compiles the
        kernels; its writes at the current position are rewritten by the replay)."""
        key = layers[0]._k.data_ptr()
        g = self._graphs.get(key)
        if g is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(b, layers)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._run(b, layers)
            if len(self._graphs) >= 4:  # caches come and go (tests, benchmarks): keep a few
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = g
        return g
