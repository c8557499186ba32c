#!/usr/bin/env python
"""kvrepl against llama.cpp and transformers on this CPU, side by side in one run.

1. decode   greedy tokens/s, 64 new tokens, prefill excluded, at 100, 2k and 6k tokens of
            context: kvrepl (its default: the GGUF's own weights on its kernels; one token a
            step, no penalty, as the others; and as shipped: drafting on, and the default
            sampling with drafting: temperature 0.2, top-p 0.9, penalty 1.1), llama.cpp
            (llama-cpp-python on the same GGUF file, 2 threads) and transformers' generate()
            (the GGUF dequantized to float32, as transformers loads it). Each keeps the prompt in
            its cache and feeds one token before decoding, so only decode is timed.
2. prefill  tokens/s of a whole prompt of 2k and 6k tokens, kvrepl and llama.cpp.
3. resume   a session of 5.6k tokens on disk, then a new kvrepl process answers one more turn:
            its time to first token (from Enter, the snapshot restore included) with the
            snapshot, and with --no-reuse; plus each process's whole run.
4. agree    greedy output of 16 fixed prompts (48 tokens each) of kvrepl and of llama.cpp
            against the float32 model: the share of tokens before the first difference.

    make bench-setup                         # once: installs llama-cpp-python (compiles it)
    .venv/bin/python bench/bench_cpu.py      # ~8 min; --quick: 100 and 2k, 2 reps

Everything compared runs interleaved (A B C, C B A, ...), after waiting for the machine to be
quiet, and is reported as medians with the CPU named. Writes bench/results/cpu-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_engine as be  # noqa: E402

from kvrepl.chat.prompt import Prompt  # noqa: E402
from kvrepl.engine import firststart, models  # noqa: E402
from kvrepl.engine.engine import Engine, Sampling  # noqa: E402

N_DECODE = 64
# One token a step, greedy, no penalty: what llama.cpp and generate() are asked for.
PLAIN = Sampling(temperature=0, repetition_penalty=1.0, draft=False)
DRAFTING = ("kvrepl drafting", "kvrepl default sampling")  # the columns with drafting on
PROMPTS = [
    "What is the capital of France?",
    "List the numbers 1 to 20 separated by commas.",
    "Write a Python function that reverses a string.",
    "Give me three tips for better sleep, as a Markdown list.",
    "Explain what a KV cache is in two sentences.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "Return a JSON object with the keys name and age for Ada Lovelace.",
    "Why is the sky blue?",
    "Name the planets of the solar system in order.",
    "Write a short email asking a colleague for a meeting.",
    "What are the primary colours?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "用一句话介绍北京。",
]


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    model = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "")
    isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags.split()]
    isa = isa or (["avx2"] if "avx2" in flags.split() else [])
    return f"{model}, {fields.get('CPU(s)', '?').strip()} cores ({', '.join(isa) or 'no AVX2'})"


# -- the three decoders --------------------------------------------------------------------


class LlamaCpp:
    """llama.cpp on a GGUF, in a process of its own (cpp_worker.py says why)."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import importlib.util

        from cpp_worker import Worker
        from cpu_load import count_as_own

        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError("llama_cpp")
        self.worker = Worker(gguf, threads)
        count_as_own(self.worker.proc.pid)

    def prefill(self, ids: list[int]) -> float:
        return self.worker.prefill(ids)

    def decode(self, ids: list[int], n: int) -> dict[str, Any]:
        got = self.worker.decode(ids, n)
        r = be.rates(got["stamps"])
        r["tokens"] = got["tokens"]
        return r


def kvrepl_engine(lm: Any) -> Engine:
    return Engine(lm.model, lm.tokenizer, end_ids=set(), context_length=lm.context_length)


def stock_transformers() -> Any:
    """The GGUF dequantized to float32 with transformers' own attention (no kvrepl code)."""
    from transformers import AutoModelForCausalLM

    folder = firststart.convert_gguf(models.embedded_gguf(), progress=False)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def bench_decode(fast: Any, hf: Any, cpp: LlamaCpp | None, prompt: Prompt, contexts: list[int],
                 reps: int) -> list[dict]:  # fmt: skip
    rows = []
    for ctx in contexts:
        ids = be.decode_prompt(prompt, ctx)
        be.log(f"decode at {len(ids)} tokens")
        engine = kvrepl_engine(fast)
        engine.prefill(ids)
        hf_cache = be.hf_prefix_cache(hf, ids)
        if cpp:
            cpp.prefill(ids)
        fns = {
            "kvrepl": lambda e=engine, i=ids: be.engine_decode(e, i, N_DECODE, PLAIN),
            "kvrepl drafting": lambda e=engine, i=ids: be.engine_decode(e, i, N_DECODE),
            "kvrepl default sampling": lambda e=engine, i=ids: be.engine_decode(
                e, i, N_DECODE, Sampling(seed=1)),
            "generate": lambda i=ids, c=hf_cache: be.hf_decode(hf, i, c, N_DECODE),
        }
        if cpp:
            fns["llama.cpp"] = lambda i=ids: cpp.decode(i, N_DECODE)
        runs = be.interleave(reps, fns)
        row = {"context": len(ids), "runs": runs}
        for k, rs in runs.items():  # drafting gives tokens in bursts: their rate is the mean
            row[k] = be.qmed(rs, "mean" if k in DRAFTING else "med")
        rows.append(row)
        be.log(f"  {', '.join(f'{k} {row[k]:.1f}' for k in runs)} tok/s")
    return rows


def bench_prefill(fast: Any, cpp: LlamaCpp | None, prompt: Prompt, contexts: list[int]) -> list:
    rows = []
    for ctx in contexts:
        ids = be.decode_prompt(prompt, ctx)

        def kv(i: list[int] = ids) -> dict:
            t = time.perf_counter()
            kvrepl_engine(fast).prefill(i)
            return {"s": time.perf_counter() - t}

        fns = {"kvrepl": kv}
        if cpp:
            fns["llama.cpp"] = lambda i=ids: {"s": cpp.prefill(i)}
        runs = be.interleave(1, fns)
        row = {"context": len(ids)}
        row.update({k: len(ids) / rs[0]["s"] for k, rs in runs.items()})
        rows.append(row)
        be.log(f"prefill {len(ids)}: {', '.join(f'{k} {row[k]:.0f}' for k in runs)} tok/s")
    return rows


# -- resume in a new process ---------------------------------------------------------------

STATS = re.compile(r"reused ([\d,]+) · prefilled ([\d,]+) · .*ttft ([\d.]+) s"
                   r"(?: \(([\d.]+) s of it loading the model\))?")


def make_session(fast: Any, store: Path, target: int) -> int:
    """A session `bench` of about `target` tokens of history, with its snapshot, made through
    kvrepl's own Conversation (messages in SQLite, the cache prefilled and saved, as `/load`
    does)."""
    from kvrepl.chat.conversation import Conversation
    from kvrepl.chat.handle import ModelHandle, Runtime
    from kvrepl.config import Settings

    settings = Settings(temperature=0.0)
    rt = Runtime.build(fast, settings)
    chat = Conversation.at(store, settings, ModelHandle.ready_with(rt, settings))
    session = chat.sessions.open_or_create("bench")
    msgs, _ = be.build_history(rt.prompt, target, seed=5)
    for m in msgs:
        chat.store.add_message(session.id, m["role"], m["content"])
    chat.sessions.refresh()
    _, prefilled, _ = chat.warm()
    chat.close()
    return prefilled


def kvrepl_turn(store: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "kvrepl", "--store", str(store), "--session", "bench",
           "--temperature", "0", "--max-tokens", "8", *extra]  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run(cmd, input="Now summarise our whole conversation in one sentence.\n",
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    wall = time.perf_counter() - t
    m = STATS.search(done.stdout + done.stderr)
    if not m:
        raise RuntimeError(f"no stats line from kvrepl: {done.stdout[-300:]} {done.stderr[-300:]}")
    waited = float(m.group(4) or 0)  # the turn's ttft counts from Enter, a wait for the model too
    return {"ttft": float(m.group(3)) - waited, "from_enter": float(m.group(3)), "wall": wall,
            "reused": int(m.group(1).replace(",", ""))}


def bench_resume(fast: Any, target: int, reps: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kvrepl-bench-"))
    try:
        base = work / "base"
        history = make_session(fast, base, target)
        be.log(f"resume: a session of {history:,} tokens")

        def run(extra: list[str]) -> dict:
            copy = work / "run"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
            return kvrepl_turn(copy, extra)

        runs = be.interleave(reps, {"snapshot": lambda: run([]),
                                    "no-reuse": lambda: run(["--no-reuse"])})  # fmt: skip
        out: dict[str, Any] = {"history": history, "runs": runs}
        for k, rs in runs.items():
            out[k] = {m: be.qmed(rs, m) for m in ("ttft", "from_enter", "wall")}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- agreement with float32 ----------------------------------------------------------------


def greedy_ids(lm: Any, ids: list[int], n: int) -> list[int]:
    return be.engine_decode(kvrepl_engine(lm), ids, n)["tokens"]


def bench_agree(fast: Any, fp32: Any, cpp: LlamaCpp | None, prompt: Prompt, n: int = 48) -> dict:
    rows = []
    for text in PROMPTS:
        ids = prompt.render([{"role": "user", "content": text}])
        ref = greedy_ids(fp32, ids, n)
        row = {"prompt": text, "kvrepl": be.agree(greedy_ids(fast, ids, n), ref)}
        if cpp:
            row["llama.cpp"] = be.agree(cpp.decode(ids, n)["tokens"], ref)
        rows.append(row)
    out: dict[str, Any] = {"tokens": n, "rows": rows}
    for k in ("kvrepl", "llama.cpp"):
        if cpp or k == "kvrepl":
            same = [r[k] for r in rows]
            out[k] = {"share": sum(same) / (n * len(rows)), "whole": sum(s == n for s in same)}
    return out


# -- report --------------------------------------------------------------------------------


def report(out: dict) -> str:
    lines = [f"### kvrepl on the CPU ({out['when']})", "", out["machine"], ""]
    lines += ["| context | kvrepl | llama.cpp | kvrepl / llama.cpp | transformers generate() "
              "| kvrepl / generate() | kvrepl, drafting on | kvrepl, default sampling |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in out["decode"]:
        cpp = r.get("llama.cpp")
        lines.append(
            f"| {r['context']:,} | {r['kvrepl']:.1f} tok/s | "
            + (f"{cpp:.1f} | **{r['kvrepl'] / cpp:.2f}×** | " if cpp else "– | – | ")
            + f"{r['generate']:.1f} | {r['kvrepl'] / r['generate']:.2f}× | "
            + f"{r['kvrepl drafting']:.1f} | {r['kvrepl default sampling']:.1f} |"
        )
    lines += ["", "| prompt | kvrepl prefill | llama.cpp prefill |", "|---:|---:|---:|"]
    for r in out["prefill"]:
        cpp = f"{r['llama.cpp']:.0f} tok/s" if "llama.cpp" in r else "–"
        lines.append(f"| {r['context']:,} | {r['kvrepl']:.0f} tok/s | {cpp} |")
    if res := out.get("resume"):
        s, n = res["snapshot"], res["no-reuse"]
        lines += ["", f"Resume, a new process, {res['history']:,} tokens of history: time to first "
                  f"token once the model is loaded {s['ttft']:.2f} s with the snapshot vs "
                  f"{n['ttft']:.2f} s with --no-reuse (**{n['ttft'] / s['ttft']:.0f}×**); from "
                  f"Enter, the model's load included, {s['from_enter']:.2f} s vs "
                  f"{n['from_enter']:.2f} s; whole process {s['wall']:.1f} s vs "
                  f"{n['wall']:.1f} s."]  # fmt: skip
    if ag := out.get("agree"):
        lines += ["", f"Greedy agreement with the float32 model, {len(ag['rows'])} prompts × "
                  f"{ag['tokens']} tokens (share of tokens before the first difference; prompts "
                  "identical throughout):"]  # fmt: skip
        for k in ("kvrepl", "llama.cpp"):
            if k in ag:
                lines.append(f"- {k}: {ag[k]['share']:.0%}; {ag[k]['whole']} of {len(ag['rows'])}")
    lines += ["", f"Command: `{out['command']}` ({out['took_s']:.0f} s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 and 2k, 2 reps, no 6k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    contexts = [100, 2000] if args.quick else [100, 2000, 6000]
    reps = 2 if args.quick else 3
    fast = models.load(progress=False)
    fp32 = models.load(dtype="float32", progress=False)
    hf = stock_transformers()
    cpp = None
    if not args.no_llama_cpp:
        try:
            cpp = LlamaCpp(models.embedded_gguf(), args.threads)
        except ImportError:
            be.log("llama-cpp-python is not installed (make bench-setup): llama.cpp left out")
    prompt = Prompt(fast.tokenizer)
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_name()}; torch {torch.__version__} ({args.threads} threads); "
        f"kvrepl {fast.model.k.label}, weights {fast.model.weight_types}",
        "command": "python bench/bench_cpu.py" + (" --quick" if args.quick else ""),
    }
    out["decode"] = bench_decode(fast, hf, cpp, prompt, contexts, reps)
    out["prefill"] = bench_prefill(fast, cpp, prompt, [c for c in contexts if c > 100])
    out["resume"] = bench_resume(fast, 2000 if args.quick else 5600, reps)
    out["agree"] = bench_agree(fast, fp32, cpp, prompt)
    out["took_s"] = time.perf_counter() - t0
    text = report(out)
    print(text)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    name = f"cpu-{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (dest / name).write_text(json.dumps(out, indent=1, default=str))
    be.log(f"wrote {dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
