"""Tiny random models of every decoder family kvrepl computes itself, from transformers' own
configs, with norms and biases randomised (a norm left at 1 or a bias at 0 would hide a backend
that drops it), and tiny GGUF files of them written under llama.cpp's tensor names (gguf-py's
writer, with llama.cpp's Q/K permutation and Gemma's 1 + w norms, as its converter writes them).

`FAMILIES` is the one list the conformance suite and the promise tests run over: a family joins
by one entry here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=320, max_position_embeddings=4096, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 500000.0}  # fmt: skip
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]

# family -> (config class, extra config, GGUF architecture name)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE}, "llama"),
    "mistral": ("MistralConfig", {"sliding_window": 8}, "llama"),
    "qwen2": ("Qwen2Config", {}, "qwen2"),
    "qwen3": ("Qwen3Config", {}, "qwen3"),
    "gemma2": ("Gemma2Config", {"sliding_window": 8, "layer_types": SLIDING,
                                "query_pre_attn_scalar": 16}, "gemma2"),  # fmt: skip
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 8, "layer_types": SLIDING,
                                    "query_pre_attn_scalar": 16}, "gemma3"),  # fmt: skip
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "sliding_window": 8}, "phi3"),
}


def make_config(family: str, layers: int = 3) -> Any:
    cls, extra, _ = FAMILIES[family]
    return getattr(transformers, cls)(num_hidden_layers=layers, **SIZES, **extra)


def make_model(family: str, seed: int = 0, layers: int = 3) -> Any:
    """A random float32 model of `family` whose every weight matters: norms around their
    neutral value (1, or 0 for Gemma's 1 + w) and biases non-zero; untied head."""
    torch.manual_seed(seed)
    config = make_config(family, layers)
    config.tie_word_embeddings = False
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def reference_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole prompt: the last position's logits."""
    with torch.no_grad():
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0, -1].float()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row permutation (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def write_gguf(model: Any, family: str, path: Path, qtype: str = "F32") -> Path:
    """The model as a GGUF file, named and laid out as llama.cpp's converter writes this
    architecture: matrices in `qtype` (gguf-py's quantizers), norms and biases F32."""
    import gguf

    from kvrepl.backends.describe import GGUF_FUSED, GGUF_NAMES, GGUF_TOP, Arch, hf_weights

    arch = Arch.from_config(model.config)
    gguf_arch = FAMILIES[family][2]
    top, layers = hf_weights(model, arch)
    w = gguf.GGUFWriter(str(path), gguf_arch)
    w.add_architecture()

    def put(name: str, t: torch.Tensor, norm: bool = False) -> None:
        a = t.detach().float().numpy().copy()
        if a.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
            return
        w.add_tensor(name, a + np.float32(1.0) if norm and arch.gemma else a)

    for i, roles in enumerate(layers):
        b = f"blk.{i}."
        q, k = roles["q"].numpy(), roles["k"].numpy()
        if gguf_arch == "llama":
            q, k = _permute(q, arch.n_heads), _permute(k, arch.n_kv)
        if arch.family.fused:
            put(b + GGUF_FUSED["qkv"], torch.from_numpy(np.concatenate([q, k, roles["v"]])))
            put(b + GGUF_FUSED["gate_up"], torch.cat([roles["gate"], roles["up"]]))
        else:
            put(b + GGUF_NAMES["q"], torch.from_numpy(q))
            put(b + GGUF_NAMES["k"], torch.from_numpy(k))
            for role in ("v", "gate", "up"):
                put(b + GGUF_NAMES[role], roles[role])
        for role in ("o", "down", "q_bias", "k_bias", "v_bias"):
            if roles[role] is not None:
                put(b + GGUF_NAMES[role], roles[role])
        for role in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm",
                     "post_ffn_norm"):  # fmt: skip
            if roles[role] is not None:
                put(b + GGUF_NAMES[role], roles[role], norm=True)
    put(GGUF_TOP["embed"], top["embed"])
    put(GGUF_TOP["final_norm"], top["final_norm"], norm=True)
    put(GGUF_TOP["lm_head"], top["lm_head"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
