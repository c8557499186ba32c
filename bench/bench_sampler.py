#!/usr/bin/env python
"""The sampler's cost per decode step, in isolation: `Sampler.next_tensor` (what the engine
calls) on the embedded model's own logits (a vocabulary of 49,152), for the sampling kvrepl
ships and a few it allows, against the time of one decode step of the fast path, measured in the
same process.

    .venv/bin/python bench/bench_sampler.py            # ~20 s
    .venv/bin/python bench/bench_sampler.py --threads 1
    .venv/bin/python bench/bench_sampler.py --engine   # + decode tok/s through the engine per
                                                       # sampling, drafting off and on (~1 min)

The logits are those of 48 greedy steps of an answer (real distributions: a confident model's
head and its long tail). Each sampling draws once per logits vector, after `seen([token])` as
the decode loop does, 4 rounds; the figure is the median time of one draw. "full sort" is the
path the sampler took for every draw before the candidate prefilter (it still takes it on a GPU,
and on the CPU when the kept set is wider than 1,024 tokens). A draw on the CPU works on the
logits in place with numpy (sampler.py). The machine is shared: the load of
other processes during the run is printed with it; rerun on a quiet machine for figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cpu import cpu_name  # noqa: E402
from cpu_load import Others  # noqa: E402

from kvrepl.chat.prompt import Prompt  # noqa: E402
from kvrepl.engine import models  # noqa: E402
from kvrepl.engine.engine import Engine, Sampling  # noqa: E402
from kvrepl.engine.sampler import Sampler  # noqa: E402

SAMPLINGS = {
    "greedy (no penalty)": Sampling.greedy(0),
    "greedy, penalty 1.1": Sampling(temperature=0),
    "default (t 0.2, top-p 0.9, penalty 1.1)": Sampling(),
    "top-p 1 (t 0.2, penalty 1.1)": Sampling(top_p=1.0),
    "top-k 40, top-p 0.9": Sampling(top_k=40),
    "t 1.0, top-p 0.95": Sampling(temperature=1.0, top_p=0.95),
}


class FullSort(Sampler):
    """The sampler as it was: every draw through the sort of the whole vocabulary."""

    def _from_candidates(self, x: torch.Tensor) -> None:
        return None


def answer_logits(lm, steps: int) -> tuple[list[int], list[torch.Tensor], float]:
    """The prompt, the logits of `steps` greedy decode steps, and one step's median time."""
    prompt = Prompt(lm.tokenizer)
    ids = prompt.render([{"role": "user", "content": "Tell me about the history of tea."}])
    engine = Engine(lm.model, lm.tokenizer, end_ids=set(), context_length=lm.context_length)
    logits = [engine.prefill(ids).clone()]
    times = []
    with torch.inference_mode():
        for _ in range(steps - 1):
            token = int(torch.argmax(logits[-1]))
            t0 = time.perf_counter()
            out = engine.runner.forward([token], engine.pc)
            times.append(time.perf_counter() - t0)
            engine.pc.append([token])
            logits.append(out.clone())
    return ids, logits, statistics.median(times)


def time_draws(cls: type[Sampler], s: Sampling, ids: list[int], logits: list[torch.Tensor],
               rounds: int) -> list[float]:  # fmt: skip
    sampler = cls(s, logits[0].numel(), torch.device("cpu"))
    sampler.seen(ids)
    times = []
    for _ in range(rounds):
        for x in logits:
            t0 = time.perf_counter()
            token = int(sampler.next_tensor(x))
            times.append(time.perf_counter() - t0)
            sampler.seen([token])
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--engine", action="store_true", help="also decode through the engine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = models.load(progress=False)
    others = Others()
    ids, logits, step_s = answer_logits(lm, args.steps)
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}")
    print(f"decode step (fast path, {len(ids)} tokens of context): {step_s * 1e3:.2f} ms")
    print(f"vocabulary {logits[0].numel():,}; {len(logits)} logits vectors x {args.rounds}\n")
    print("| sampling | draw (median) | p90 | of a step | full sort (before) | of a step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in SAMPLINGS.items():
        t = sorted(time_draws(Sampler, s, ids, logits, args.rounds))
        med, p90 = statistics.median(t), t[int(0.9 * (len(t) - 1))]
        row = [name, f"{med * 1e6:,.0f} us", f"{p90 * 1e6:,.0f} us", f"{100 * med / step_s:.1f}%"]
        if s.temperature > 0:  # greedy never sorted: the same path before and now
            old = statistics.median(time_draws(FullSort, s, ids, logits, args.rounds))
            row += [f"{old * 1e6:,.0f} us", f"{100 * old / step_s:.1f}%"]
        else:
            row += ["(the same)", ""]
        print("| " + " | ".join(row) + " |")
    print(f"\nother processes used {others.cores():.2f} cores during the run")
    if args.engine:
        through_the_engine(lm)
    return 0


ENGINE_MODES = {
    "greedy, no penalty": Sampling.greedy(0),
    "greedy with the penalty": Sampling(temperature=0),
    "default sampling": Sampling(seed=1),
}


def through_the_engine(lm, reps: int = 5, tokens: int = 128) -> None:  # noqa: ANN001
    """Decode tok/s (Stats) of each sampling through Engine.stream, drafting off and on, after
    the same ~100-token prompt, the modes interleaved in one process, medians of `reps`."""
    import bench_engine as be

    engine = Engine(lm.model, lm.tokenizer, end_ids=set(), context_length=lm.context_length)
    ids = be.decode_prompt(Prompt(lm.tokenizer), 100)
    engine.prefill(ids)
    modes = {f"{k}, drafting {d}": replace(s, draft=d == "on")
             for k, s in ENGINE_MODES.items() for d in ("off", "on")}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(reps):
        for k, s in modes.items():
            rates[k].append(be.engine_decode(engine, ids, tokens, s)["stats"]["decode_tok_s"])
    base = statistics.median(rates["greedy, no penalty, drafting off"])
    print(f"\nthrough the engine ({tokens} tokens after {len(ids)}, medians of {reps}):\n")
    print("| sampling | tok/s | against greedy, drafting off |\n|---|---:|---:|")
    for k, r in rates.items():
        print(f"| {k} | {statistics.median(r):.1f} | {statistics.median(r) / base:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
