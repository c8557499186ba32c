"""A model's fingerprint: the identity a K/V snapshot must match before it is trusted (the
model's label, config, dtype or mode, tokenizer vocabulary, chat template and a sample of its
weights). Never loads a model."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def weights_digest(model: Any, per_tensor: int = 256) -> str:
    """A hash of an evenly spread sample of every weight: two models that differ only in their
    weights (same folder name, same config) get different fingerprints. Milliseconds."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
            h.update(name.encode())
            h.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()


def fingerprint(identity: str, config: Any, dtype: str, tokenizer: Any, weights: str = "") -> str:
    """A short hash of what decides the K/V a model computes for given ids: identity, config,
    dtype, tokenizer vocabulary, chat template and (a sample of) the weights. Snapshots from
    another fingerprint are refused."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    h = hashlib.sha256()
    h.update(identity.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(dtype.encode())
    h.update(_vocab_json(tokenizer))
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(weights.encode())
    return h.hexdigest()[:32]


_VOCAB: dict[tuple[int, int], tuple[Any, bytes]] = {}  # the last tokenizer's, at its size


def _vocab_json(tokenizer: Any) -> bytes:
    """The vocabulary as the fingerprint hashes it, made once per tokenizer and size (a load
    fingerprints its model twice, once for each kv_bits; a 262k-token vocabulary took 0.8 s a
    time). Only the last tokenizer's is kept; one that grew is made again."""
    key = (id(tokenizer), len(tokenizer))
    got = _VOCAB.get(key)
    if got is None or got[0] is not tokenizer:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
        _VOCAB.clear()
        got = _VOCAB[key] = (tokenizer, vocab)
    return got[1]
