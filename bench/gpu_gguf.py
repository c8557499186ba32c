"""GGUF blocks on the GPU path (kvrepl/backends/gpu/qweights.py), for bench_gpu.py: the check
(`--check`) and the figure (`--gguf`).

check: the Triton matmul over Q8_0/Q4_0/Q4_1/Q4_K blocks (plain, silu * up, residual, rotary): each
row alone equals the batch's, bit for bit, and its distance from the bf16 kernel over the same
weights dequantized (not bit-identical: seen on an H100); a 135M-shaped model over blocks: one
prefill equals chunks and graph-replayed decode steps (logits, K/V), reuse equals --no-reuse.

figure: decode tok/s at the 1B and 8B shapes (random weights, each matrix shape quantized once
with gguf-py's quantize, every layer its own copy on the GPU) in bf16, Q8_0 and Q4_0, side by
side in one run, with the bytes a step reads and the share of the datasheet's bandwidth.

Seen on an NVIDIA H100 80GB (2026-12-06, torch 2.11.0+cu130, Triton 3.6.0): every row invariant,
chunks = prefill bitwise, reuse = --no-reuse; distance from the bf16 kernel 0.03-0.4% of the
largest output (last bits), 1.2-1.4% of the logits for the 135M model; decode tok/s (bf16 / Q8_0
/ Q4_0): 1B 869 / 524 / 551, 8B 179 / 113 / 116 (56%, 18%, 10% and 77%, 26%, 14% of the
bandwidth): the dequantization, not the bytes, bounds it so far. (The figure then replayed one
mode's captured graphs for the next: the loaders were never compared; it now clears them.)
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

QTYPES = ("Q8_0", "Q4_0", "Q4_1")


def quantized(w: torch.Tensor, qtype: str) -> Any:
    """w [n, k] as gguf-py quantizes it, in blocks on w's device; Q4_K (gguf-py has no Q4_K
    quantizer): random Q4_K blocks of w's shape, small float16 d and dmin (the checks need the
    format, not w's values)."""
    import gguf
    import numpy as np

    from kvrepl.backends.gpu import qweights

    if qtype == "Q4_K":
        n, k = w.shape
        rng = np.random.default_rng(n * 7 + k)
        raw = rng.integers(0, 256, size=(n * k // 256, 144), dtype=np.uint8)
        raw[:, 0:4] = rng.uniform(0.0, 1e-4, size=(raw.shape[0], 2)).astype(np.float16) \
            .view(np.uint8)  # fmt: skip
        return qweights.from_blocks(raw, qtype, n, k).to(w.device)
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w.detach().float().cpu().numpy(), kind)
    return qweights.from_blocks(raw, qtype, *w.shape).to(w.device)


class Blocks:
    """A GGUFBlocks stand-in over a transformers model's own weights: each distinct matrix
    shape quantized once (gguf-py is slow), each layer given its own copy on the device."""

    def __init__(self, model: Any, qtype: str, shared: bool = True) -> None:
        from kvrepl.backends.describe import Arch, hf_weights

        self.top, self.roles = hf_weights(model, Arch.from_config(model.config))
        self.qtype, self.shared, self._done = qtype, shared, {}

    def _q(self, w: torch.Tensor) -> Any:
        key = tuple(w.shape) if self.shared else w.data_ptr()
        if key not in self._done:
            self._done[key] = quantized(w, self.qtype)
        qw = self._done[key]
        m = None if qw.m is None else qw.m.clone()
        return type(qw)(qw.qtype, qw.q.clone(), qw.d.clone(), m)

    def layer(self, i: int) -> dict[str, Any]:
        r = self.roles[i]
        return {"qkv": self._q(torch.cat([r["q"], r["k"], r["v"]])),
                "gate_up": self._q(torch.cat([r["gate"], r["up"]])),
                "o": self._q(r["o"]), "down": self._q(r["down"])}  # fmt: skip

    def lm_head(self) -> Any:
        return self._q(self.top["lm_head"])


def check_gguf() -> dict:
    from kvrepl.backends.gpu import triton_ops as T

    out: dict[str, Any] = {}
    now = T.QLOAD
    for T.QLOAD in ("elements", "blocks"):
        for qt in (*QTYPES, "Q4_K"):
            out[f"{qt}_{T.QLOAD}"] = check_kernels(qt)
    T.QLOAD = now
    for qt in ("Q4_1", "Q8_0"):  # (the 135M shape's rows of 576 do not split into Q4_K's 256)
        out[f"model_{qt}"] = check_model(qt)
    out["ok"] = all(v for r in out.values() for v in r.values() if isinstance(v, bool))
    return out


def check_kernels(qt: str) -> dict:
    from kvrepl.backends.gpu import triton_ops as T

    torch.manual_seed(0)
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(200, 4096, **bf)
    qw = quantized(torch.randn(1536, 4096, device="cuda") * 0.02, qt)
    w = qw.dequantize(torch.bfloat16)
    r: dict[str, Any] = {}
    for name, n, kw in (("plain", 1536, {}), ("glu", 768, {"glu": True})):
        a, b = torch.empty(200, n, **bf), torch.empty(200, n, **bf)
        T.matmul(x, qw, a, **kw)
        T.matmul(x, w, b, **kw)
        r[f"{name}_bf16_rel_err"] = _rel(a, b)
        r[f"{name}_invariant"] = all(torch.equal(T.matmul(x[i : i + 1], qw, torch.empty(1, n, **bf),
                                                          **kw)[0], a[i])
                                     for i in (0, 1, 15, 16, 199))  # fmt: skip
    res = torch.randn(200, 1536, **bf)
    a, b = res.clone(), res.clone()
    T.matmul(x, qw, a, residual=a)
    T.matmul(x, w, b, residual=b)
    r["residual_bf16_rel_err"] = _rel(a, b)
    qkv = quantized(torch.randn(48 * 128, 4096, device="cuda") * 0.02, qt)
    r["rope_bf16_rel_err"] = _rope_same(T, x[:64].contiguous(), qkv)
    r.update(_qfloats(T, x, qw, b.shape[1]))
    return r


def _qfloats(T: Any, x: torch.Tensor, qw: Any, n: int) -> dict:
    """triton_ops.QFLOAT's ways against each other: "bits" bit-identical to "convert", and
    "f16" row-invariant (its distance from convert recorded)."""
    now, outs = T.QFLOAT, {}
    try:
        for T.QFLOAT in ("convert", "bits", "f16"):
            outs[T.QFLOAT] = T.matmul(x, qw, torch.empty(x.shape[0], n, device="cuda",
                                                         dtype=torch.bfloat16))  # fmt: skip
        one = T.matmul(x[16:17], qw, torch.empty(1, n, device="cuda", dtype=torch.bfloat16))
    finally:
        T.QFLOAT = now
    return {"bits_equal_convert": torch.equal(outs["bits"], outs["convert"]),
            "f16_invariant": torch.equal(one[0], outs["f16"][16]),
            "f16_convert_rel_err": _rel(outs["f16"], outs["convert"])}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far the blocks' result is from the bf16 kernel's over the dequantized weights (not
    bit-identical on an H100: the tensor-core path differs for a tile computed in registers)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _rope_same(T: Any, x: torch.Tensor, qkv: Any) -> float:
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    heads, kvh, d = 32, 8, 128
    cos, sin = torch.rand(4096, d, device="cuda"), torch.rand(4096, d, device="cuda")
    outs = []
    for w in (qkv, qkv.dequantize(torch.bfloat16)):
        q = torch.empty(x.shape[0], heads * d, **bf)
        kc, vc = torch.zeros(kvh, 4096, d, **bf), torch.zeros(kvh, 4096, d, **bf)
        T.matmul_rope(x, w, q, cos, sin, kc, vc, torch.tensor([900], device="cuda"), heads, kvh)
        outs.append((q, kc, vc))
    return max(_rel(a, b) for a, b in zip(*outs, strict=True))


def check_model(qt: str) -> dict:
    import bench_gpu as B

    from kvrepl.backends.gpu.model import GpuModel

    model = B.build("135M", 4096)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # untied
    blocks = Blocks(model, qt, shared=False)
    gm = GpuModel(model, 4096, blocks=blocks)
    ref = GpuModel(model, 4096)
    ref.lm_head = gm.lm_head.dequantize(torch.bfloat16)
    for lq, lr in zip(gm.layers, ref.layers, strict=True):
        for name in ("qkv", "gate_up", "o", "down"):
            lr[name] = lq[name].dequantize(torch.bfloat16)
    ids = B.tokens(400, 1)
    whole, parts, plain = gm.new_layers(), gm.new_layers(), ref.new_layers()
    a = gm.forward(ids, whole)
    gm.forward(ids[:200], parts)
    for t in ids[200:205]:  # graph replays
        gm.forward([t], parts)
    b = gm.forward(ids[205:], parts)
    c = ref.forward(ids, plain)
    kv = all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
             for x, y in zip(whole, parts, strict=True))  # fmt: skip
    eng = B.check_engine(gm)
    return {"chunks_bitwise": torch.equal(a, b), "bf16_model_rel_err": _rel(a, c),
            "kv_bitwise": kv, **{k: v for k, v in eng.items() if isinstance(v, bool)}}  # fmt: skip


def read_bytes(gm: Any) -> int:
    """What a decode step reads of the weights: every matrix, the norms, the LM head."""
    def size(w: Any) -> int:
        if w is None:
            return 0
        return w.nbytes() if hasattr(w, "nbytes") and callable(w.nbytes) else \
            w.numel() * w.element_size()  # fmt: skip

    total = size(gm.lm_head) + size(gm.final_norm)
    for lw in gm.layers:
        total += sum(size(w) for w in lw.values() if w is not None)
    return total


# the figure's GGUF modes: "now" the kernel as it is; "convert", "bits", "f16": triton_ops.QFLOAT's;
# "elements" its element loader; "picks" the
# configs in the file KVREPL_QPICKS names (gpu_qtune.py --picks), "old" the configs before them
MODES = tuple(os.environ.get("KVREPL_GGUF_MODES", "old,now").split(","))
_NOW: dict = {}


def _mode(T: Any, mode: str) -> None:
    if not _NOW:
        _NOW.update(QLOAD=T.QLOAD, QPICK=dict(T.QPICK), QDECODE=T.QDECODE, QFLOAT=T.QFLOAT)
    T.QLOAD, T.QPICK, T.QDECODE = _NOW["QLOAD"], dict(_NOW["QPICK"]), _NOW["QDECODE"]
    T.QFLOAT = _NOW["QFLOAT"]
    if mode in ("convert", "bits", "f16"):  # QFLOAT: the int -> float instruction, the bits,
        T.QFLOAT = mode  # or float16 weights and activations where the scales are float16
    elif mode == "elements":
        T.QLOAD = "elements"
    elif mode == "picks":
        picks = json.loads(Path(os.environ["KVREPL_QPICKS"]).read_text())
        T.QPICK = {(qt, n, k, pair): (bn, w, st, ql) for qt, n, k, pair, bn, w, st, ql in picks}
    elif mode == "old":  # _config's tiles, as before _qdecode
        T.QLOAD, T.QPICK, T.QDECODE = "blocks", {}, False


def figure(shapes: list[str]) -> list[dict]:
    import bench_gpu as B

    from kvrepl.backends.gpu import triton_ops as T
    from kvrepl.backends.gpu.model import GpuModel

    name = torch.cuda.get_device_name()
    peak = next(v for k, v in B.PEAK.items() if k in name)
    rows = []
    for shape in shapes:
        model = B.build(shape, 4096)
        prompt = B.tokens(128, 2)
        row: dict[str, Any] = {"shape": shape, "gpu": name}
        for qt in ("bf16", "Q8_0", "Q4_0", "Q4_K"):
            gm = GpuModel(model, 4096, blocks=None if qt == "bf16" else Blocks(model, qt))
            for mode in ("now",) if qt == "bf16" else MODES:
                _mode(T, mode)
                gm._graphs.clear()  # captured with the mode before (the figure once timed one
                # loader twice: the first mode's graphs replayed for the second)
                key = qt if qt == "bf16" else f"{qt}_{mode}"
                B.kvrepl_decode(gm, prompt, 8)  # compile, capture
                tok_s = statistics.median(B.kvrepl_decode(gm, prompt, 128) for _ in range(3))
                read = read_bytes(gm)
                row[key] = {"tok_s": round(tok_s, 1), "read_gb": round(read / 1e9, 3),
                            "of_bandwidth": round(tok_s * read / peak, 3),
                            "x_bf16": round(tok_s / row["bf16"]["tok_s"], 2) if key != qt
                            else 1.0}  # fmt: skip
            del gm
            torch.cuda.empty_cache()
        _mode(T, "now")
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    return rows
