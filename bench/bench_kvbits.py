#!/usr/bin/env python
"""kv_bits 16 against 8 on the embedded SmolLM2-135M-Instruct (CPU fast path), side by side in one
run: the K/V's bytes per token in memory and on disk (a snapshot written to a temporary pool),
decode tokens/s at a ~6k-token context (greedy, no drafting, runs interleaved 16, 8, 8, 16 ...,
each after waiting for the machine to be quiet; the median of the quiet runs), and how far greedy
answers with 8-bit K/V agree with 16-bit ones on a fixed prompt set (per prompt: the first
position where they differ, and the share of positions holding the same token).

    .venv/bin/python bench/bench_kvbits.py            # 6k context, 10 prompts x 64 tokens
    .venv/bin/python bench/bench_kvbits.py --quick    # 1k context, 3 prompts x 16 tokens

Writes nothing outside a temporary folder; prints a markdown report with the CPU named.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_engine as be  # noqa: E402
from bench_cpu import PROMPTS, cpu_name  # noqa: E402

from kvrepl.chat.prompt import Prompt  # noqa: E402
from kvrepl.engine import models  # noqa: E402
from kvrepl.engine.engine import Engine, Sampling  # noqa: E402
from kvrepl.events import Stats  # noqa: E402
from kvrepl.store.kvstore import KVStore  # noqa: E402

BITS = (16, 8)


def engine(lm: Any) -> Engine:
    return Engine(lm.model, lm.tokenizer, end_ids=set(), context_length=lm.context_length)


def greedy(n: int) -> Sampling:
    return replace(Sampling.greedy(n), draft=False)  # one token a step: the decode's own speed


def answer(e: Engine, ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after ids (the cached prefix reused), and their decode rate."""
    stats = None
    for ev in e.stream(ids, greedy(n)):
        if isinstance(ev, Stats):
            stats = ev
    assert stats is not None
    return list(e.progress.generated), stats.decode_tok_s


def bytes_per_token(lms: dict[int, Any], ids: list[int]) -> dict[int, tuple[float, float]]:
    """Per kv_bits: (bytes a token's K/V take in memory, bytes in a snapshot on disk)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits, lm in lms.items():
            e = engine(lm)
            e.prefill(ids)
            memory = sum(k.element_size() * k[..., :1, :].numel() * 2 for k, _ in e.pc.export())
            kv = KVStore(Path(tmp) / str(bits))
            kv.save("bench", *e.export(), lm.fingerprint)
            out[bits] = (memory, kv.size_bytes("bench") / len(ids))
    return out


def decode_rates(lms: dict[int, Any], ids: list[int], n: int, reps: int) -> dict[int, float]:
    engines = {bits: engine(lm) for bits, lm in lms.items()}
    for e in engines.values():
        e.prefill(ids)

    def run(bits: int) -> dict:
        return {"tok_s": answer(engines[bits], ids, n)[1]}

    runs = be.interleave(reps, {bits: (lambda b=bits: run(b)) for bits in BITS})
    return {bits: be.qmed(rs, "tok_s") for bits, rs in runs.items()}


def agreement(lms: dict[int, Any], prompt: Prompt, prompts: list[str], n: int) -> list[dict]:
    rows = []
    for text in prompts:
        ids = prompt.render([{"role": "user", "content": text}])
        a, b = (answer(engine(lms[bits]), ids, n)[0] for bits in BITS)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        same = sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b), 1)
        rows.append({"prompt": text, "first_diff": first, "same": same, "n": len(a)})
        be.log(f"  {text[:40]!r}: first difference {first}, {same:.0%} the same")
    return rows


def report(args: argparse.Namespace, sizes: dict, rates: dict, agree: list[dict], ctx: int):
    print("# kv_bits 16 vs 8 — SmolLM2-135M-Instruct Q4_1, CPU fast path\n")
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}\n")
    print("| | 16-bit K/V | 8-bit K/V | 8 / 16 |")
    print("|---|---|---|---|")
    for i, what in enumerate(("bytes per token in memory", "bytes per token on disk")):
        a, b = sizes[16][i], sizes[8][i]
        print(f"| {what} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
    a, b = rates[16], rates[8]
    print(f"| decode tok/s at {ctx:,} tokens ({args.tokens} tokens, median of "
          f"{args.reps}) | {a:.1f} | {b:.1f} | {b / a:.2f} |")  # fmt: skip
    print(f"\nGreedy agreement of 8-bit with 16-bit K/V, {len(agree)} prompts x {args.answer} "
          "tokens:\n")  # fmt: skip
    print("| prompt | first difference at | same tokens |")
    print("|---|---|---|")
    for r in agree:
        first = "none" if r["first_diff"] is None else str(r["first_diff"])
        print(f"| {r['prompt'][:48]} | {first} | {r['same']:.0%} |")
    firsts = [r["first_diff"] if r["first_diff"] is not None else r["n"] for r in agree]
    whole = sum(r["first_diff"] is None for r in agree)
    print(f"\n{whole} of {len(agree)} answers identical; median first difference at "
          f"{statistics.median(firsts):.0f}; {statistics.mean(r['same'] for r in agree):.0%} "
          "of positions the same.")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1k context, 3 prompts x 16 tokens")
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per timed run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--answer", type=int, default=64, help="tokens per compared answer")
    args = ap.parse_args()
    if args.quick:
        args.context, args.tokens, args.reps, args.prompts, args.answer = 1000, 16, 2, 3, 16
    lms = {bits: models.load(progress=False, kv_bits=bits) for bits in BITS}
    prompt = Prompt(lms[16].tokenizer)
    ids = be.decode_prompt(prompt, args.context)
    be.log(f"bytes per token ({len(ids)} tokens)")
    sizes = bytes_per_token(lms, ids)
    be.log(f"decode at {len(ids)} tokens")
    t = time.perf_counter()
    rates = decode_rates(lms, ids, args.tokens, args.reps)
    be.log(f"  {rates} ({time.perf_counter() - t:.0f} s)")
    be.log("greedy agreement")
    agree = agreement(lms, prompt, PROMPTS[: args.prompts], args.answer)
    report(args, sizes, rates, agree, len(ids))


if __name__ == "__main__":
    main()
