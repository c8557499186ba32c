#!/usr/bin/env python
"""How close kvrepl's CPU decode comes to this machine's memory bandwidth, side by side with
llama.cpp, and what a verified drafted row costs (issue 19).

One run prints, with the CPU named:
  - the machine's bandwidth: a 512 MB float32 sum on --threads threads (torch), GB/s;
  - for the embedded 135M model and a Llama-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads,
    ffn 8192, vocab 128256, random weights, cached in bench/results/) twice: Q4_1 everywhere,
    and the types of a Q4_K_M file (Q4_K, with Q6_K for the head and some attn_v/ffn_down),
    and IQ4_XS everywhere but the head (Q6_K):
    decode tok/s at ~100 tokens of context (and at each of --contexts), the weight bytes a
    token reads, and the share of the cap that is: the GGUF file's bytes a token needs x tok/s /
    bandwidth (K/V reads not counted, so at long context the share says less), for kvrepl and
    for llama.cpp, and kvrepl / llama.cpp;
  - the cost of a verified row at ~100: the time of an 8-row and a 16-row forward (every row's
    logits, as drafting verifies) over M times a 1-row step.

    /work/main/.venv/bin/python bench/bench_bandwidth.py             # this tree, ~100 tokens
    ... bench/bench_bandwidth.py --contexts 100,2000,6000            # the README's run
    ... bench/bench_bandwidth.py --tree /tmp/old --tree .            # before / after, one run

kvrepl's longer contexts are random K/V put in its cache (decode's time depends on the length,
not the values), then ~100 computed tokens; llama.cpp's are a prefill of random ids, once (the
1B shape at 6k takes it minutes).

Each --tree is measured in its own process (its kvrepl imported from that folder, checked);
llama.cpp (llama-cpp-python, when installed) in the main process. Times are the best of the
runs (this machine is shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GGUF_1B = ROOT / "bench" / "results" / "llama1b-shape-q4_1-mins.gguf"
GGUF_1B_KM = ROOT / "bench" / "results" / "llama1b-shape-q4_k_m.gguf"
GGUF_1B_XS = ROOT / "bench" / "results" / "llama1b-shape-iq4_xs-v5k.gguf"
SHAPE_1B = dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256)
CTX, STEPS = 100, 24
MODELS = ("135M", "1B", "1B Q4_K_M", "1B IQ4_XS")


def bandwidth(threads: int, reps: int = 9) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 << 20)  # 512 MB
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for the layers whose attn_v and ffn_down take Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_1b(path: Path, mix: str = "Q4_1") -> None:
    """Random weights in the 1B shape; no tokenizer beyond a list of placeholder tokens. `mix`:
    Q4_1 everywhere, or Q4_K_M's types as llama.cpp's quantizer picks them (Q4_K; Q6_K for the
    tied embedding, which is the head, and for attn_v and ffn_down in the layers `_more_bits`
    names), the mix users download most, or IQ4_XS (Q6_K for the tied embedding, Q5_K for
    attn_v, as llama.cpp's quantizer picks it where heads share K/V)."""
    import gguf

    s, rng = SHAPE_1B, np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type({"Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                     "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
                     "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS}[mix])  # fmt: skip
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(s["vocab"])])
    w.add_token_scores([0.0] * s["vocab"])
    w.add_token_types([1] * s["vocab"])
    Q = gguf.GGMLQuantizationType

    def blocks(qt: Any, n: int, k: int) -> np.ndarray:
        """Random blocks (every bit pattern is a valid one) with small positive float16 scales
        (Q4_1: its min between -12 d and -4 d, as a quantizer's asymmetric block; never exactly
        -8 d, which kvrepl would keep as Q4_0's, in fewer bytes than the file)."""
        bs, nb = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (n * k // bs, nb), dtype=np.uint8)
        d = rng.uniform(0.002, 0.02, raw.shape[0]).astype(np.float16)
        m = (-d.astype(np.float32) * rng.uniform(4.0, 12.0, raw.shape[0])).astype(np.float16)
        fields = {Q.Q4_1: [(0, d), (2, m)], Q.Q4_K: [(0, d), (2, d)], Q.Q5_K: [(0, d), (2, d)],
                  Q.Q6_K: [(208, d)], Q.IQ4_XS: [(0, d)]}
        for off, v in fields[qt]:
            raw[:, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(n, k // bs * nb)

    def qtype(name: str, i: int) -> Any:
        if mix == "Q4_1":
            return Q.Q4_1
        if mix == "IQ4_XS":  # attn_v Q5_K where 4+ heads share a K/V head, as llama.cpp's
            return {"token_embd": Q.Q6_K, "attn_v": Q.Q5_K}.get(name, Q.IQ4_XS)
        if name == "token_embd" or (name in ("attn_v", "ffn_down") and _more_bits(i, s["layers"])):
            return Q.Q6_K
        return Q.Q4_K

    h, f, kvw = s["hidden"], s["ffn"], s["kv"] * s["hidden"] // s["heads"]
    t = qtype("token_embd", 0)
    w.add_tensor("token_embd.weight", blocks(t, s["vocab"], h), raw_dtype=t)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(s["layers"]):
        b = f"blk.{i}."
        for name, n, k in (("attn_q", h, h), ("attn_k", kvw, h), ("attn_v", kvw, h),
                           ("attn_output", h, h), ("ffn_gate", f, h), ("ffn_up", f, h),
                           ("ffn_down", h, f)):  # fmt: skip
            t = qtype(name, i)
            w.add_tensor(b + name + ".weight", blocks(t, n, k), raw_dtype=t)
        w.add_tensor(b + "attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def gguf_bytes(path: Path, tied_head: bool) -> int:
    """Weight bytes a llama.cpp token reads: every 2-D tensor but the embedding, plus the
    embedding when it is the head too."""
    import gguf

    r = gguf.GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(b for n, b in names.items() if n != "token_embd.weight")
    return total + (names["token_embd.weight"] if "output.weight" not in names else 0)


# -- kvrepl, in a child process per tree ----------------------------------------------------
def kvrepl_models(threads: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig

    import kvrepl
    from kvrepl.backends.cpu import native
    from kvrepl.backends.cpu.gguf_model import from_gguf
    from kvrepl.engine import models

    torch.set_num_threads(threads)
    s = SHAPE_1B
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv"], vocab_size=s["vocab"], rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=True)  # fmt: skip
    k = native.kernels(models.cache_dir())
    return {
        "kvrepl": kvrepl.__file__,
        "135M": models.load(progress=False).model,
        "1B": from_gguf(GGUF_1B, cfg, k, 8192),
        "1B Q4_K_M": from_gguf(GGUF_1B_KM, cfg, k, 8192),
        "1B IQ4_XS": from_gguf(GGUF_1B_XS, cfg, k, 8192),
    }


def head_bytes(fm: Any) -> int:
    """Weight bytes a kvrepl token reads: every layer matrix and the head (not the embedding
    table, of which one row is read, unless it is the head)."""
    mats = [fm.lm_head]
    for lw in fm.layers:
        mats += [p for p, _ in lw.qkv] + [lw.o, lw.down] + [p for p, _ in lw.gate_up]
    return sum(p.nbytes() for p in mats)


def fill(layers: list[Any], n: int) -> None:
    """n positions of random K/V in every layer (decode reads them as it reads computed ones:
    its time depends on the length, not the values), so a long context costs no prefill."""
    import torch

    gen = torch.Generator().manual_seed(1)
    for layer in layers:
        k0, _ = layer.room(0)  # the empty buffers: their shape and dtype
        shape = (*k0.shape[:2], n, k0.shape[-1])
        if k0.dtype.is_floating_point:
            k, v = ((torch.randn(shape, generator=gen) * 0.5).to(k0.dtype) for _ in "kv")
        else:  # 8-bit K/V rows: any bytes
            k, v = (torch.randint(0, 64, shape, generator=gen).to(k0.dtype) for _ in "kv")
        layer.extend([(k, v)])


def kvrepl_measure(fm: Any, reps: int, ctx: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    vocab = fm.lm_head.n
    layers = fm.new_layers()
    if ctx > CTX:
        fill(layers, ctx - CTX)
    fm.forward(rng.integers(0, vocab, CTX).tolist(), layers)
    base = layers[0].get_seq_length()

    def back() -> None:
        for c in layers:
            c.advance(base)

    def step_time(m: int, n: int) -> float:
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fm.forward([7] * m, layers, all_logits=m > 1)
            ts.append(time.perf_counter() - t)
            back()
        return min(ts)

    decode, rows = [], {8: [], 16: []}
    for _ in range(reps):
        t1 = step_time(1, STEPS)
        decode.append(1 / t1)
        if ctx == CTX:
            for m in rows:
                rows[m].append(step_time(m, max(3, STEPS // m)) / (m * t1))
    return {"tok_s": max(decode), "bytes": head_bytes(fm),
            **{f"row{m}": min(v) for m, v in rows.items() if v}}  # fmt: skip


def child(tree: str, threads: int, reps: int, contexts: list[int]) -> None:
    sys.path.insert(0, tree)
    got = kvrepl_models(threads)
    here = str(Path(got["kvrepl"]).resolve())
    assert here.startswith(str(Path(tree).resolve())), (here, tree)
    out = {"kvrepl": here, "label": got["135M"].k.label}
    for name in MODELS:
        out[name] = {str(c): kvrepl_measure(got[name], reps, c) for c in contexts}
    print("RESULT " + json.dumps(out), flush=True)


# -- llama.cpp --------------------------------------------------------------------------------
def llama_measure(path: Path, threads: int, reps: int, contexts: list[int]) -> dict | None:
    """llama.cpp's decode tok/s at each context (its cache filled by a prefill of random ids,
    once; each run rewinds to it)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=max(contexts) + 64, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)  # fmt: skip
    out = {}
    for ctx in contexts:
        llm.reset()
        llm.eval(np.random.default_rng(1).integers(10, 1000, ctx).tolist())
        rates = []
        for _ in range(reps):
            ts = []
            for _ in range(STEPS):
                llm.n_tokens = ctx  # rewind: eval drops the cache past n_tokens
                t = time.perf_counter()
                llm.eval([7])
                ts.append(time.perf_counter() - t)
            rates.append(1 / min(ts))
        out[str(ctx)] = max(rates)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tree", action="append", help="a kvrepl checkout to measure (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contexts", default="100", help="tokens of context, e.g. 100,2000,6000")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    contexts = sorted({max(CTX, int(c)) for c in args.contexts.split(",")})
    if args.child:
        child(args.child, args.threads, args.reps, contexts)
        return 0
    GGUF_1B.parent.mkdir(parents=True, exist_ok=True)
    for path, mix in ((GGUF_1B, "Q4_1"), (GGUF_1B_KM, "Q4_K_M"), (GGUF_1B_XS, "IQ4_XS")):
        if not path.is_file():
            print(f"writing {path} (random weights) ...", flush=True)
            write_1b(path, mix)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_cpu import cpu_name  # here, not at the top: a --child imports its tree's kvrepl

    from kvrepl.engine import models

    bw = bandwidth(args.threads)
    print(f"{cpu_name()}; {args.threads} threads; bandwidth (512 MB sum) {bw:.1f} GB/s")
    files = {"135M": (models.embedded_gguf(), True), "1B": (GGUF_1B, True),
             "1B Q4_K_M": (GGUF_1B_KM, True), "1B IQ4_XS": (GGUF_1B_XS, True)}  # fmt: skip
    cpp = {name: llama_measure(path, args.threads, args.reps, contexts)
           for name, (path, _) in files.items()}  # fmt: skip
    for name, (path, tied) in files.items():
        nb = gguf_bytes(path, tied)
        for ctx, rate in (cpp[name] or {}).items():
            print(f"  llama.cpp {name:9} at {ctx:>5}: {rate:6.1f} tok/s, {nb / 1e6:6.1f} MB/token "
                  f"read, {100 * nb * rate / 1e9 / bw:5.1f}% of the cap (GGUF bytes x tok/s / "
                  f"bandwidth: {bw * 1e9 / nb:.0f} tok/s)")  # fmt: skip
    for tree in args.tree or [str(ROOT)]:
        cmd = [sys.executable, __file__, "--child", tree, "--threads", str(args.threads),
               "--reps", str(args.reps), "--contexts", args.contexts]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"  {tree}: failed\n{done.stderr[-2000:]}")
            continue
        report_tree(json.loads(line[7:]), files, cpp, bw)
    return 0


def report_tree(r: dict, files: dict, cpp: dict, bw: float) -> None:
    print(f"  kvrepl from {r['kvrepl']} ({r['label']})")
    for name, (path, tied) in files.items():
        nb = gguf_bytes(path, tied)
        for ctx, m in r[name].items():
            theirs = (cpp[name] or {}).get(ctx)
            vs = f", {m['tok_s'] / theirs:.2f}x llama.cpp" if theirs else ""
            rows = (f"; a verified row costs {m['row8']:.2f} (8 rows) / {m['row16']:.2f} (16) of "
                    "a step" if "row8" in m else "")  # fmt: skip
            print(f"    kvrepl {name:9} at {ctx:>5}: {m['tok_s']:6.1f} tok/s{vs}, "
                  f"{m['bytes'] / 1e6:6.1f} MB/token read, "
                  f"{100 * nb * m['tok_s'] / 1e9 / bw:5.1f}% of the cap{rows}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
