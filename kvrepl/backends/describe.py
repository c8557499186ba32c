"""The model description: one decoder's architecture and its weights by role, read by every
backend (the CPU fast path from a GGUF file or a transformers model, the GPU path).

Owns which decoder families kvrepl computes itself and everything that tells them apart: norms
(Gemma's scale by 1 + w, its norms after attention and after the feed-forward), q/k/v biases,
per-head q/k norms, fused q/k/v and gate/up (Phi-3), softcaps, sliding layers, partial rotary
and rope scaling (through the model's own rotary embedding), the embedding scale. A family is one
entry in `FAMILIES`; its weights are found by role in a transformers model (`hf_weights`) and in a
GGUF file under llama.cpp's tensor names (`GGUF_NAMES`). A model this cannot describe raises
`Unsupported` with the reason in one line; a backend that cannot compute a described term
refuses it the same way (`Arch.refusal`), never drops it.
Never runs a kernel, never loads a file.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch


class Unsupported(Exception):
    """A model (or a term of it) a backend does not compute; the message says why in one line."""


@dataclass(frozen=True)
class Family:
    """What sets a family's layer apart from Llama's."""

    gemma: bool = False  # norms scale by 1 + w; norms after attention and feed-forward;
    #                      query_pre_attn_scalar; embeddings times sqrt(hidden)
    fused: bool = False  # Phi-3: one qkv_proj, one gate_up_proj (gate first)
    all_slide: bool = False  # Mistral, Phi-3: `sliding_window` applies to every layer
    qkv_bias: bool | None = False  # True: always (Qwen2); None: the config's attention_bias


LLAMA = Family(qkv_bias=None)
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": Family(all_slide=True),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qkv_bias=None),
    "gemma2": Family(gemma=True, qkv_bias=None),
    "gemma3_text": Family(gemma=True, qkv_bias=None),
    "gemma3": Family(gemma=True, qkv_bias=None),
    "phi3": Family(fused=True, all_slide=True),
}
# The transformers module that holds a model type's rotary embedding.
ROPE_MODULE = {"gemma3_text": "gemma3"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh")
MIXTURES = ("moe", "mixtral", "dbrx", "jamba", "jetmoe", "gpt_oss", "llama4", "deepseek")


def _rope_params(cfg: Any) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = next(iter(params.values()))  # per layer type (Gemma 3): the same factor
    return dict(params) if isinstance(params, dict) else {}


@dataclass
class Arch:
    """A decoder's architecture, from its transformers config (the only source: a GGUF file's
    config is read into one by transformers)."""

    model_type: str
    family: Family
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    eps: float
    act: str
    attn_scale: float
    windows: list[int]  # per layer: 0 = full attention, else the sliding window
    layer_types: list[str]
    rope_dim: int
    rope_type: str
    qkv_bias: bool
    qk_norm: bool
    embed_scale: float = 1.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    max_context: int = 0  # the model's own limit (longrope: its original length)

    @property
    def gemma(self) -> bool:
        return self.family.gemma

    @classmethod
    def from_config(cls, config: Any) -> Arch:
        cfg = config.get_text_config(decoder=True)
        mt = cfg.model_type
        if any(m in mt for m in MIXTURES) or getattr(cfg, "num_local_experts", 0):
            raise Unsupported(f"{mt!r} is a mixture of experts")
        fam = FAMILIES.get(mt)
        if fam is None:
            raise Unsupported(f"architecture {mt!r} is not one kvrepl's kernels describe")
        n = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)[:n]
        window = getattr(cfg, "sliding_window", None) or 0
        if fam.all_slide and window:
            types = ["sliding_attention"] * n
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise Unsupported(f"activation {act!r} is not one kvrepl's kernels compute")
        if getattr(cfg, "mlp_bias", False):
            raise Unsupported("feed-forward biases are not computed by kvrepl's kernels")
        bias = fam.qkv_bias if fam.qkv_bias is not None else getattr(cfg, "attention_bias", False)
        if fam.qkv_bias is None and bias:
            raise Unsupported("an attention output bias is not computed by kvrepl's kernels")
        rope = _rope_params(cfg)
        rope_type = str(rope.get("rope_type") or rope.get("type") or "default")
        factor = rope.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None)
        max_ctx = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        if rope_type in ("longrope", "dynamic"):  # the factors change with the prompt's length
            max_ctx = int(getattr(cfg, "original_max_position_embeddings", 0) or
                          rope.get("original_max_position_embeddings") or max_ctx)  # fmt: skip
        if fam.gemma:
            scale, embed = cfg.query_pre_attn_scalar**-0.5, cfg.hidden_size**0.5
        else:
            scale, embed = head_dim**-0.5, 1.0
        return cls(
            model_type=mt,
            family=fam,
            n_layers=n,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            ffn=cfg.intermediate_size,
            eps=float(cfg.rms_norm_eps),
            act=act,
            attn_scale=float(scale),
            windows=[window if t == "sliding_attention" else 0 for t in types],
            layer_types=types,
            rope_dim=int(head_dim * float(factor or 1.0)),
            rope_type=rope_type,
            qkv_bias=bool(bias),
            qk_norm=mt in ("qwen3", "gemma3_text", "gemma3"),
            embed_scale=float(embed),
            attn_softcap=float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
            final_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
            max_context=max_ctx,
        )

    def terms(self) -> set[str]:
        """The terms beyond a plain Llama layer that this model has (what a backend must
        compute or refuse)."""
        named = {
            "q/k/v biases": self.qkv_bias,
            "q/k norms": self.qk_norm,
            "Gemma norms": self.gemma,
            "sliding windows": any(self.windows),
            "attention softcap": bool(self.attn_softcap),
            "final softcap": bool(self.final_softcap),
            "partial rotary": self.rope_dim != self.head_dim,
            "GELU": self.act != "silu",
        }
        return {name for name, present in named.items() if present}

    def refusal(self, backend: str, computes: set[str]) -> None:
        """Raise Unsupported when this model has a term the backend does not compute."""
        missing = sorted(self.terms() - computes)
        if missing:
            raise Unsupported(f"{backend} does not compute {', '.join(missing)} "
                              f"({self.model_type})")  # fmt: skip

    def kv_bytes(self, tokens: int, bytes_per_value: int) -> int:
        """Bytes of K/V for `tokens` positions in every layer."""
        return 2 * self.n_layers * self.n_kv * self.head_dim * tokens * bytes_per_value


def context_for(arch: Arch, asked: int) -> tuple[int, str | None]:
    """The context the cache is sized for: the setting (0: the model's maximum), never past the
    model's own limit; with a line when the model's limit cut it."""
    if asked and asked <= arch.max_context:
        return asked, None
    if asked and arch.rope_type in ("longrope", "dynamic"):
        return arch.max_context, (
            f"context {arch.max_context:,} tokens: {arch.rope_type} rope changes every position "
            "past it with the prompt's length, which no kept cache can follow"
        )
    return arch.max_context, None


# -- weights by role -----------------------------------------------------------------------
LAYER_ROLES = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "o",
               "post_attn_norm", "ffn_norm", "gate", "up", "down", "post_ffn_norm")  # fmt: skip


def hf_weights(model: Any, arch: Arch) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """A transformers model's weights by role: (embed, final_norm, lm_head; per layer the
    LAYER_ROLES, None where absent). Norm weights as stored (Gemma's w, not 1 + w)."""
    inner = model.model if hasattr(model, "model") else model
    if hasattr(inner, "language_model"):
        inner = inner.language_model
    d = arch.head_dim
    layers = []
    for hl in inner.layers:
        at, mlp = hl.self_attn, hl.mlp
        if arch.family.fused:
            q, k, v = at.qkv_proj.weight.split([arch.n_heads * d, arch.n_kv * d, arch.n_kv * d])
            gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        else:
            q, k, v = at.q_proj.weight, at.k_proj.weight, at.v_proj.weight
            gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        roles: dict[str, Any] = dict.fromkeys(LAYER_ROLES)
        roles.update(attn_norm=hl.input_layernorm.weight, q=q, k=k, v=v, o=at.o_proj.weight,
                     gate=gate, up=up, down=mlp.down_proj.weight)  # fmt: skip
        if arch.qkv_bias:
            roles.update(q_bias=at.q_proj.bias, k_bias=at.k_proj.bias, v_bias=at.v_proj.bias)
        if arch.qk_norm:
            roles.update(q_norm=at.q_norm.weight, k_norm=at.k_norm.weight)
        if arch.gemma:
            roles.update(post_attn_norm=hl.post_attention_layernorm.weight,
                         ffn_norm=hl.pre_feedforward_layernorm.weight,
                         post_ffn_norm=hl.post_feedforward_layernorm.weight)  # fmt: skip
        else:
            roles["ffn_norm"] = hl.post_attention_layernorm.weight
        layers.append({r: (w.detach() if w is not None else None) for r, w in roles.items()})
    embed = inner.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach() if hasattr(model, "lm_head") else embed
    top = {"embed": embed, "final_norm": inner.norm.weight.detach(), "lm_head": head}
    return top, layers


# llama.cpp's tensor names (gguf-py's TENSOR_NAMES) for each role; Phi-3's fused ones apart.
GGUF_NAMES = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight",
    "v": "attn_v.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "o": "attn_output.weight", "post_attn_norm": "post_attention_norm.weight",
    "ffn_norm": "ffn_norm.weight", "gate": "ffn_gate.weight", "up": "ffn_up.weight",
    "down": "ffn_down.weight", "post_ffn_norm": "post_ffw_norm.weight",
}  # fmt: skip
GGUF_FUSED = {"qkv": "attn_qkv.weight", "gate_up": "ffn_up.weight"}
GGUF_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
            "lm_head": "output.weight"}  # fmt: skip
# llama.cpp permutes Q/K rows for its rope in these GGUF architectures (transformers undoes it).
GGUF_PERMUTED = ("llama",)


def gguf_qk_order(rows: int, heads: int) -> Any:
    """transformers' reverse of llama.cpp's Q/K row permutation, as a row order (numpy)."""
    import numpy as np

    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)


def gguf_layer_roles(arch: Arch) -> list[str]:
    """The roles a GGUF layer of this architecture holds (bias and norm roles only when the
    architecture has them)."""
    roles = ["attn_norm", "o", "ffn_norm", "down"]
    roles += ["q", "k", "v", "gate", "up"] if not arch.family.fused else []
    roles += ["q_bias", "k_bias", "v_bias"] if arch.qkv_bias else []
    roles += ["q_norm", "k_norm"] if arch.qk_norm else []
    roles += ["post_attn_norm", "post_ffn_norm"] if arch.gemma else []
    return roles


def norm_weight(w: torch.Tensor, arch: Arch) -> torch.Tensor:
    """A norm weight as a layer multiplies by it (float32): Gemma's norms scale by 1 + w."""
    w = w.detach().float()
    return (1.0 + w).contiguous() if arch.gemma else w.contiguous()


class RopeTable:
    """cos/sin [positions, rope_dim] per layer type, from the model's own rotary embedding (so
    rope scaling is transformers' own), computed in fixed blocks of positions as they are first
    needed, so a position's values never depend on which positions were computed with it."""

    BLOCK = 1024

    def __init__(self, config: Any) -> None:
        cfg = config.get_text_config(decoder=True)
        name = ROPE_MODULE.get(cfg.model_type, cfg.model_type)
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
        self.rotary = rotary(cfg)
        self.takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.kinds = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.n = 0

    def table(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer type's table (a model whose types all share one rotary: that one)."""
        return self.tables.get(kind) or self.tables[self.kinds[0]]

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
