#!/usr/bin/env python
"""kvrepl on an NVIDIA GPU: its decode against transformers' `generate()` (dynamic cache, and
static cache compiled) and against the memory-bandwidth limit, for three Llama shapes built from
configs with random bf16 weights (no downloads; SmolLM2's 49,152-token vocabulary); and the time
to first token of a 50-token turn after 16k tokens of history, reused against recomputed.

    python bench/bench_gpu.py --check    # correctness first: kernels, invariance, graphs (~1 min)
    python bench/bench_gpu.py --check --parts gguf   # one part of it
    python bench/bench_gpu.py            # the figures (~6 min on an H200)
    python bench/bench_gpu.py --shapes 135M,1B --no-static
    python bench/bench_gpu.py --memory   # GPU memory at Llama-3.1-8B's and Qwen3-4B's shapes
    python bench/bench_gpu.py --gguf 1B,8B   # GGUF Q8_0/Q4_0 blocks against bf16 (gpu_gguf.py)
    python bench/bench_gpu.py --drafts 135M,1B,8B   # a verification of k drafts against a step

--check: each kernel against torch; a row computed alone and in a batch bit-identical (matmul,
norm, attention across splits); a 135M-shaped model's logits and K/V bit-identical whether its
prompt ran in one prefill or in chunks and graph-replayed decode steps; reuse against --no-reuse
over turns and an edit, tokens and logits; a snapshot saved and restored through the store;
drafted tokens verified with every row's logits, each row bitwise a decode step's, and answers
with drafting (ahead of the host and not) the same tokens and K/V as without;
every model family (tests/families.py) against transformers, chunk/decode bitwise, reuse;
GGUF blocks against the bf16 kernels over their dequantized weights (gpu_gguf.py).
Prints one JSON line per part; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvrepl.engine.engine import Engine, Sampling  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, ffn
    "135M": (576, 30, 9, 3, 1536),
    "1B": (2048, 16, 32, 8, 8192),
    "8B": (4096, 32, 32, 8, 14336),
}
VOCAB = 49152


def build_config(shape: str, ctx: int) -> Any:
    from transformers import LlamaConfig

    hidden, layers, heads, kv, ffn = SHAPES[shape]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                       max_position_embeddings=ctx, tie_word_embeddings=shape == "135M",
                       rope_theta=100000.0)  # fmt: skip


def build(shape: str, ctx: int) -> Any:
    from transformers import LlamaForCausalLM

    cfg = build_config(shape, ctx)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to("cuda")
    model.generation_config.pad_token_id = 0
    return model


def gpu_model(model: Any, ctx: int) -> Any:
    from kvrepl.backends.gpu.model import GpuModel

    return GpuModel(model, ctx)


def engine(gm: Any, reuse: bool = True) -> Engine:
    return Engine(gm, _Tok(), end_ids=set(), context_length=gm.context_length, reuse=reuse)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(5, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Tok:  # the engine decodes text with a tokenizer; random ids need none
    def decode(self, ids: Any, **k: Any) -> str:
        return ""

    def convert_ids_to_tokens(self, i: Any) -> str:
        return ""


# -- --check -------------------------------------------------------------------------------


def _alone(fn: Any, rows: tuple[int, ...], batch: torch.Tensor) -> bool:
    """fn(r) computes row r alone; each must equal the batch's row r bit for bit."""
    return all(torch.equal(fn(r), batch[r]) for r in rows)


def check_kernels() -> dict:
    from kvrepl.backends.gpu import triton_ops as T

    torch.manual_seed(0)
    out: dict[str, Any] = {}
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    rows = (0, 1, 7, 15, 16, 100, 199)
    x = torch.randn(200, 4096, **bf)
    w = torch.randn(1536, 4096, **bf) * 0.02
    y = torch.empty(200, 1536, **bf)
    T.matmul(x, w, y)
    ref = x.float() @ w.float().T
    out["matmul_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
    one = lambda n: torch.empty(1, n, **bf)  # noqa: E731
    out["matmul_invariant"] = _alone(lambda r: T.matmul(x[r : r + 1], w, one(1536))[0], rows, y)
    g = torch.empty(200, 768, **bf)  # silu(gate) * up, in the matmul's epilogue
    T.matmul(x, w, g, glu=True)
    want = torch.nn.functional.silu(ref[:, :768]) * ref[:, 768:]
    out["glu_rel_err"] = float((g.float() - want).abs().max() / want.abs().max())
    out["glu_invariant"] = _alone(lambda r: T.matmul(x[r : r + 1], w, one(768), glu=True)[0],
                                  rows, g)  # fmt: skip
    nw = torch.rand(4096, **bf) + 0.5
    n0 = torch.empty_like(x)
    T.rmsnorm(x, nw, 1e-5, n0)
    out["rmsnorm_invariant"] = _alone(
        lambda r: T.rmsnorm(x[r : r + 1], nw, 1e-5, one(4096))[0], (0, 5, 199), n0
    )
    kvh, cap, d, heads, m, pos0 = 8, 4096, 128, 32, 300, 1900
    kc = torch.randn(kvh, cap, d, **bf)
    vc = torch.randn(kvh, cap, d, **bf)
    q = torch.randn(m, heads * d, **bf)
    o = torch.empty_like(q)
    part = torch.empty(T.part_floats(m, kvh, cap, heads // kvh, d), device="cuda")
    T.attention(q, kc, vc, torch.tensor([pos0], device="cuda"), o, part, 0, d**-0.5)
    errs, same = [], []
    for r in (0, 123, 299):  # rows on both sides of a split at 2048
        p = pos0 + r
        qq = q[r].view(heads, 1, d).float()
        kk = kc[:, : p + 1].float().repeat_interleave(heads // kvh, 0)
        vv = vc[:, : p + 1].float().repeat_interleave(heads // kvh, 0)
        want = torch.softmax(qq @ kk.transpose(1, 2) * d**-0.5, -1) @ vv
        errs.append(float((o[r].float() - want.reshape(-1)).abs().max()))
        o1 = torch.empty_like(o[:1])
        T.attention(q[r : r + 1].contiguous(), kc, vc, torch.tensor([p], device="cuda"), o1,
                    part, 0, d**-0.5)  # fmt: skip
        same.append(torch.equal(o1[0], o[r]))
    out["attention_max_err"] = max(errs)
    out["attention_invariant"] = all(same)
    out.update(check_rope(T))
    out["ok"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out


def check_rope(T: Any) -> dict:
    """matmul_rope against the torch contract (kvrepl/backends/gpu/model.py), and row by row."""
    from kvrepl.backends.describe import RopeTable
    from kvrepl.backends.gpu.model import ops_for

    bf = {"device": "cuda", "dtype": torch.bfloat16}
    heads, kvh, d, m, pos0 = 32, 8, 128, 64, 1000
    x = torch.randn(m, 4096, **bf)
    w = torch.randn((heads + 2 * kvh) * d, 4096, **bf) * 0.02
    cfg = build_config("8B", 4096)
    rope = RopeTable(cfg)
    rope.upto(4096)
    cos, sin = (t.cuda() for t in next(iter(rope.tables.values())))
    pos = torch.tensor([pos0], device="cuda")

    def run(ops: Any, xs: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = xs.shape[0]
        q = torch.empty(n, heads * d, **bf)
        kc, vc = torch.zeros(kvh, 4096, d, **bf), torch.zeros(kvh, 4096, d, **bf)
        ops.matmul_rope(xs, w, q, cos, sin, kc, vc, p, heads, kvh)
        return q, kc, vc

    q, kc, vc = run(T, x, pos)
    q2, kc2, vc2 = run(ops_for("torch"), x, pos)
    pairs = ((q, q2), (kc, kc2), (vc, vc2))
    err = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    same = []
    for r in (0, 17, 63):
        qa, ka, va = run(T, x[r : r + 1], pos + r)
        p = pos0 + r
        same.append(torch.equal(qa[0], q[r]) and torch.equal(ka[:, p], kc[:, p])
                    and torch.equal(va[:, p], vc[:, p]))  # fmt: skip
    return {"rope_max_err": err, "rope_invariant": all(same)}


def check_model() -> dict:
    model = build("135M", 4096)
    gm = gpu_model(model, 4096)
    ids = tokens(700, 1)
    whole = gm.new_layers()
    a = gm.forward(ids, whole)
    parts = gm.new_layers()
    gm.forward(ids[:300], parts)
    for t in ids[300:306]:  # graph replays
        gm.forward([t], parts)
    b = gm.forward(ids[306:], parts)
    kv_same = all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
                  for x, y in zip(whole, parts, strict=True))  # fmt: skip
    graphs = gm.new_layers()
    gm.forward(ids[:305], graphs)
    g = gm.forward(ids[305:306], graphs)  # a graph replay
    gm.graphs = False
    eager = gm.new_layers()
    gm.forward(ids[:305], eager)
    e = gm.forward(ids[305:306], eager)
    gm.graphs = True
    out = {"logits_bitwise": torch.equal(a, b), "kv_bitwise": kv_same,
           "graph_equals_eager": torch.equal(g, e),
           "weights_ahead_bitwise": _ahead_same(gm, ids[:305], ids[305], g)}  # fmt: skip
    out.update(check_engine(gm))
    out.update(check_drafts(gm))
    out["ok"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out


def _ahead_same(gm: Any, prefix: list[int], token: int, want: torch.Tensor) -> bool:
    """A graph step with the other triton_pdl.AHEAD (the next weights asked into L2, or not)
    gives the same logits, bit for bit."""
    from kvrepl.backends.gpu import triton_pdl as P

    was = P.AHEAD
    P.AHEAD = 24 if was == 0 else 0
    try:
        gm._graphs.clear()
        layers = gm.new_layers()
        gm.forward(prefix, layers)
        return torch.equal(gm.forward([token], layers), want)
    finally:
        P.AHEAD = was
        gm._graphs.clear()


def check_drafts(gm: Any) -> dict:
    """Drafting on the GPU (on by default where the kernels are batch-invariant): every row of
    a verification bit-identical to a decode step (a graph replay) after its prefix, at 2, 9 and
    17 rows; and the engine's answers with drafts fed whenever the lookup matches, running ahead
    of the host and not, greedy and sampled, the same tokens and K/V as drafting off."""
    ids = tokens(120, 30)
    rows_ok = True
    for n in (2, 9, 17):
        layers = gm.new_layers()
        gm.forward(ids[:100], layers)
        rows = gm.forward(ids[100 : 100 + n], layers, all_logits=True)
        for i in range(n):
            alone = gm.new_layers()
            gm.forward(ids[: 100 + i], alone)
            rows_ok &= torch.equal(gm.forward([ids[100 + i]], alone), rows[i])
    prompt = tokens(30, 31) * 3
    same, drafted, accepted = True, 0, 0
    for sampling in (Sampling.greedy(48), Sampling(temperature=0.7, seed=5, max_tokens=48)):
        off = engine(gm)
        list(off.stream(prompt, Sampling(**{**vars(sampling), "draft": False})))
        for ahead in (True, False):
            on = engine(gm)
            on.runner.ahead = ahead
            on.draft_policy.pin(rate=0.95, cost=0.0)  # draft on any match
            list(on.stream(prompt, sampling))
            pairs = zip(on.pc.cache.layers, off.pc.cache.layers, strict=True)
            same &= on.progress.generated == off.progress.generated and on.pc.ids == off.pc.ids
            same &= all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
                        for x, y in pairs)  # fmt: skip
            drafted, accepted = drafted + on.progress.drafted, accepted + on.progress.accepted
    return {"draft_rows_bitwise": rows_ok, "drafting_equals_no_drafting": same,
            "drafts_fed": drafted > 0, "drafted": drafted, "accepted": accepted}  # fmt: skip


def draft_costs(shape: str, ctx: int = 1024, reps: int = 30) -> dict:
    """What verifying k drafted tokens costs on the GPU: a forward of k + 1 rows with every
    row's logits against a decode step (each a graph replay), at `ctx` tokens of context;
    and the rate a forward whose drafts are all taken gives, in decode steps."""
    model = build(shape, ctx + 64)
    gm = gpu_model(model, ctx + 64)
    layers = gm.new_layers()
    gm.forward(tokens(ctx, 40), layers)

    def timed(m: int) -> float:
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            if m == 1:
                gm.forward([7], layers)
            else:
                gm.forward(list(range(7, 7 + m)), layers, all_logits=True)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
            for layer in layers:
                layer.crop(ctx - layer.get_seq_length())
        return statistics.median(ts[3:])

    step = timed(1)
    row: dict[str, Any] = {"shape": shape, "context": ctx, "step_us": step * 1e6}
    for k in (1, 3, 7, 15):
        t = timed(k + 1)
        row[f"rows{k + 1}_us"] = t * 1e6
        row[f"all_taken_{k}"] = (k + 1) * step / t  # tokens per step's time, every draft taken
    return row


def check_engine(gm: Any) -> dict:
    from kvrepl.store.kvstore import KVStore

    reuse, fresh = engine(gm), engine(gm, reuse=False)
    ids: list[int] = []
    same, logits_same = True, True
    for turn in range(4):
        ids = ids + tokens(60 + 10 * turn, 10 + turn)
        if turn == 2:
            ids = ids[:70] + ids[90:]  # an edit
        list(reuse.stream(ids, Sampling.greedy(16)))
        list(fresh.stream(ids, Sampling.greedy(16)))
        same &= reuse.progress.generated == fresh.progress.generated
        ids = ids + reuse.progress.generated
        logits_same &= torch.equal(reuse.prefill(ids), fresh.prefill(ids))
    with tempfile.TemporaryDirectory() as d:
        store = KVStore(Path(d))
        store.save("s", list(reuse.pc.ids), reuse.pc.export(), "fp")
        back = engine(gm)
        back.restore(store.load("fp", reuse.pc.ids))
        restored = all(torch.equal(x.keys, y.keys) for x, y in
                       zip(back.pc.cache.layers, reuse.pc.cache.layers, strict=True))  # fmt: skip
    return {"reuse_tokens_equal": same, "reuse_logits_bitwise": logits_same,
            "snapshot_restored_bitwise": restored, **check_ahead(gm)}  # fmt: skip


def check_ahead(gm: Any) -> dict:
    """Decoding ahead of the host (the engine's GPU loop) against token by token: the same
    tokens and K/V, greedy and sampled with the settings' penalty, and after an end id."""
    prompt = tokens(90, 20)
    same = True
    for sampling in (Sampling.greedy(24), Sampling(temperature=0.7, seed=5, max_tokens=24)):
        ahead, plain = engine(gm), engine(gm)
        plain.runner.ahead = False
        list(plain.stream(prompt, sampling))
        want = list(plain.progress.generated)
        for e in (ahead, plain):
            e.end_ids = {want[10]}
            e.pc.keep_first(0)
            list(e.stream(prompt, sampling))
        same &= ahead.progress.generated == plain.progress.generated == want[: want.index(want[10])]
        pairs = zip(ahead.pc.cache.layers, plain.pc.cache.layers, strict=True)
        same &= ahead.pc.ids == plain.pc.ids and all(torch.equal(x.keys, y.keys) for x, y in pairs)
    return {"ahead_equals_token_by_token": same}


def check_families(device: str = "cuda", backend: str = "triton") -> dict:
    """Every family the description holds, on the Triton kernels: last logits against
    transformers' float32 forward of the same model (as close as transformers' own bf16 forward
    is, at worst twice as far), one prefill against chunks and graph-replayed decode steps bit for
    bit (logits, K/V), reuse against --no-reuse token for token; a family the kernels lack a
    term of is refused by name."""
    sys.path.insert(0, str(ROOT / "tests"))
    from families import FAMILIES, make_model, reference_logits

    from kvrepl.backends.describe import Unsupported
    from kvrepl.backends.gpu.model import GpuModel

    out: dict[str, Any] = {}
    ids = tokens(40, 7)
    ids = [i % 300 + 3 for i in ids]
    for family in FAMILIES:
        model = make_model(family, seed=3)
        want = reference_logits(model, ids)
        bf = model.to(device, torch.bfloat16)
        hf_bf16 = reference_logits(bf, ids).cpu()
        try:
            gm = GpuModel(bf, 512, backend=backend)
        except Unsupported as exc:
            out[family] = {"refused": str(exc)}
            continue
        whole = gm.new_layers()
        a = gm.forward(ids, whole).cpu()
        parts = gm.new_layers()
        gm.forward(ids[:17], parts)
        for t in ids[17:30]:
            gm.forward([t], parts)
        b = gm.forward(ids[30:], parts).cpu()
        kv = all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
                 for x, y in zip(whole, parts, strict=True))  # fmt: skip
        rel = float((a - want).abs().max() / want.abs().max())
        hf_rel = float((hf_bf16 - want).abs().max() / want.abs().max())
        reuse, fresh = engine(gm), engine(gm, reuse=False)
        seq, same = list(ids), True
        for turn in range(3):
            seq = seq + [(7 * turn + j) % 300 + 3 for j in range(9)]
            list(reuse.stream(seq, Sampling.greedy(8)))
            list(fresh.stream(seq, Sampling.greedy(8)))
            same &= reuse.progress.generated == fresh.progress.generated
            seq = seq + reuse.progress.generated
        out[family] = {"rel_err": rel, "transformers_bf16_rel_err": hf_rel,
                       "close": rel <= 2 * hf_rel + 0.02, "chunks_bitwise": torch.equal(a, b),
                       "kv_bitwise": kv, "reuse_tokens_equal": same}  # fmt: skip
    oks = [v[k] for v in out.values() for k in ("close", "chunks_bitwise", "kv_bitwise",
                                                  "reuse_tokens_equal") if k in v]  # fmt: skip
    out["gemma2_refused_by_name"] = "attention softcap" in out.get("gemma2", {}).get("refused", "")
    out["ok"] = all(oks) and out["gemma2_refused_by_name"]
    return out


MEMORY_SHAPES = {  # config class, sizes: Llama-3.1-8B's and Qwen3-4B's
    "llama3.1-8B": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                         "rope_theta": 500000.0})),
    "qwen3-4B": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=9728,
        max_position_embeddings=40960, tie_word_embeddings=True)),
}  # fmt: skip


def memory(context: int = 8192) -> list[dict]:
    """GPU memory of the CUDA path for real model shapes (random bf16 weights): the weights as
    transformers holds them, then kvrepl's (held once) and a cache of `context` tokens, and the
    peak while building; plus what the model's whole context would need."""
    import transformers

    from kvrepl.backends.describe import Arch
    from kvrepl.backends.gpu.model import GpuModel
    from kvrepl.engine import placement

    rows = []
    for name, (cls, sizes) in MEMORY_SHAPES.items():
        gc.collect()
        torch.cuda.empty_cache()
        cfg = getattr(transformers, cls)(**sizes)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        base = torch.cuda.memory_allocated()
        model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to("cuda")
        weights = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        placement.check_cache_fits(model, context)
        gm = GpuModel(model, context, consume=True)
        del model
        gc.collect()
        layers = gm.new_layers()
        held = torch.cuda.memory_allocated() - base
        peak = torch.cuda.max_memory_allocated() - base
        arch = Arch.from_config(cfg)
        gib = 2**30
        rows.append({"shape": name, "context": context, "weights_gib": weights / gib,
                     "held_gib": held / gib, "peak_gib": peak / gib,
                     "kv_gib": arch.kv_bytes(context, 2) / gib,
                     "kv_full_context_gib": arch.kv_bytes(arch.max_context, 2) / gib,
                     "full_context": arch.max_context})  # fmt: skip
        del gm, layers
    return rows


# -- figures -------------------------------------------------------------------------------


def decode_rate(fn: Any, n: int) -> float:
    torch.cuda.synchronize()
    stamps = fn(n)
    iv = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return 1.0 / iv[len(iv) // 2]


def kvrepl_decode(gm: Any, prompt: list[int], n: int) -> float:
    """Decode tokens/s as the engine's own Stats count it (random ids decode to no text, so
    there is no event per token to time)."""
    e = engine(gm)
    sampling = Sampling(**{**vars(Sampling.greedy(n)), "draft": False})  # one token a step
    stats = list(e.stream(prompt, sampling))[-1]
    return stats.decode_tok_s


def hf_decode(model: Any, prompt: list[int], n: int, static: bool) -> list[float]:
    stamps: list[float] = []

    class Stamp:
        def put(self, v: Any) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    x = torch.tensor([prompt], device="cuda")
    kw: dict[str, Any] = {"cache_implementation": "static"} if static else {}
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, streamer=Stamp(), **kw)  # fmt: skip
    return stamps[1:]


def ttft(gm: Any, history: int) -> dict:
    hist, turn = tokens(history, 3), tokens(50, 4)
    e = engine(gm)
    e.prefill(hist)
    out = {}
    for name, eng in (("reuse", e), ("recompute", engine(gm, reuse=False))):
        torch.cuda.synchronize()
        stats = list(eng.stream(hist + turn, Sampling.greedy(1)))[-1]
        out[name] = stats.ttft_s  # Enter to the first token, as kvrepl shows it
    return out


PEAK = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet bytes/s (SXM), by the device's name


def copy_bandwidth() -> float:
    """Bytes/s a device-to-device copy of 1 GiB moves, counting bytes read and written (the
    median of 10): the ceiling a real kernel meets, below the datasheet's."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        b.copy_(a)
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2**30 / statistics.median(times[2:])


def limits(row: dict, model: Any, copy_bps: float) -> None:
    """The bytes a decode step must read (every weight but the input embedding's unread rows,
    when it is not the LM head too), and the rates the datasheet's and the copy's bandwidth
    allow for them."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    read = nbytes - (0 if tied else embed.numel() * embed.element_size())
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in name), copy_bps)
    row["weights_gb"], row["read_gb"] = nbytes / 1e9, read / 1e9
    row["bandwidth_limit"], row["copy_limit"] = peak / read, copy_bps / read
    row["of_limit"] = row["kvrepl"] / row["bandwidth_limit"]
    row["of_copy_limit"] = row["kvrepl"] / row["copy_limit"]


def bench_shape(shape: str, static: bool, copy_bps: float, n: int = 128) -> dict:
    model = build(shape, 16384 + 512)
    gm = gpu_model(model, 16384 + 512)
    prompt = tokens(128, 2)
    kvrepl_decode(gm, prompt, 8)  # warm-up: compile the kernels, capture the graph
    row: dict[str, Any] = {"shape": shape}
    row["kvrepl"] = statistics.median(kvrepl_decode(gm, prompt, n) for _ in range(3))
    hf_decode(model, prompt, 4, False)
    row["generate"] = decode_rate(lambda k: hf_decode(model, prompt, k, False), n)
    if static:
        t = time.perf_counter()
        hf_decode(model, prompt, 8, True)
        row["static_warmup_s"] = time.perf_counter() - t
        row["generate_static"] = decode_rate(lambda k: hf_decode(model, prompt, k, True), n)
    limits(row, model, copy_bps)
    row["ttft_16k"] = ttft(gm, 16384)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--parts", default="kernels,model,families,gguf",
                    help="--check's parts, in order (a part that raises fails, the rest run)")
    ap.add_argument("--shapes", default="135M,1B,8B")
    ap.add_argument("--no-static", action="store_true")
    ap.add_argument("--static-only", action="store_true", help="8B generate(static) alone")
    ap.add_argument("--memory", action="store_true", help="GPU memory at 8B and 4B shapes")
    ap.add_argument("--gguf", default=None, metavar="SHAPES", help="GGUF blocks vs bf16")
    ap.add_argument("--drafts", default=None, metavar="SHAPES",
                    help="what verifying drafted tokens costs against a decode step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__}  # fmt: skip
    import transformers

    env["transformers"] = transformers.__version__
    print(json.dumps(env), flush=True)
    results: list[dict] = []
    if args.static_only:
        model = build("8B", 4096)
        prompt = tokens(128, 2)
        t = time.perf_counter()
        hf_decode(model, prompt, 8, True)
        r = {
            "static_warmup_s": time.perf_counter() - t,
            "generate_static": decode_rate(lambda k: hf_decode(model, prompt, k, True), 128),
        }
        print(json.dumps(r), flush=True)
        return 0
    if args.memory:
        for r in memory():
            print(json.dumps(r), flush=True)
        return 0
    if args.gguf:
        import gpu_gguf

        for r in gpu_gguf.figure(args.gguf.split(",")):
            print(json.dumps(r), flush=True)
        return 0
    if args.drafts:
        for shape in args.drafts.split(","):
            print(json.dumps(draft_costs(shape)), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        return 0
    if args.check:
        import gpu_gguf

        parts = {"kernels": check_kernels, "model": check_model, "families": check_families,
                 "gguf": gpu_gguf.check_gguf}  # fmt: skip
        for name in args.parts.split(","):
            part = parts[name]
            try:
                r = {"part": part.__name__, **part()}
            except Exception as e:  # noqa: BLE001 - a part that raises fails; the others still run
                r = {"part": part.__name__, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
            print(json.dumps(r), flush=True)
            results.append(r)
        ok = all(r["ok"] for r in results)
    else:
        copy_bps = copy_bandwidth()
        print(json.dumps({"copy_tb_s": copy_bps / 1e12}), flush=True)
        for shape in args.shapes.split(","):
            r = bench_shape(shape, shape == "8B" and not args.no_static, copy_bps)
            gc.collect()
            torch.cuda.empty_cache()
            print(json.dumps(r), flush=True)
            results.append(r)
        ok = True
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
