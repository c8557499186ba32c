#!/usr/bin/env python
"""Drafting on and off, task by task: decode tokens/s of the embedded model on the CPU fast path
with prompt-lookup drafting (the default) and with --no-draft, on fixed tasks that repeat much
of their prompt (edit, quote, rewrite: drafts are taken) and on prose (they are not).

    .venv/bin/python bench/bench_draft.py               # ~6 min on a quiet machine
    .venv/bin/python bench/bench_draft.py --quick       # 1 repetition, 2 tasks of each kind
    .venv/bin/python bench/bench_draft.py --sampling default   # the shipped sampling, seed 0

Per task: the median decode rate (Stats.decode_tok_s: generated tokens over their time, the
prefill left out) with drafting and without, their ratio, the share of drafted tokens the
answer took, the drafted tokens per generated one and the tokens a forward gives (1 without
drafting). Both answers are compared token for
token (drafting must not change them). Runs alternate (off, on, on, off, ...), each after
waiting for the machine to be quiet, with the load other processes put on it recorded; one
engine per mode runs every task in turn, as a session would (the drafting policy learns what a
verified row costs and how often drafts are taken). Goal: >= 2x on the edit tasks, >= 0.97x on
prose. Writes nothing; prints a markdown table with the CPU named.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_engine as be  # noqa: E402
from bench_cpu import cpu_name  # noqa: E402

from kvrepl.chat.prompt import Prompt  # noqa: E402
from kvrepl.engine import models  # noqa: E402
from kvrepl.engine.engine import Engine, Sampling  # noqa: E402
from kvrepl.events import Stats  # noqa: E402

FUNCTION = '''def average(values):
    """The mean of a list of numbers; 0.0 for an empty list."""
    if not values:
        return 0.0
    total = 0
    for value in values:
        total += value
    return total / len(valuse)
'''
LIST = ("- apples\n- bread\n- milk\n- eggs\n- cheddar cheese\n- tomatoes\n- olive oil\n- rice\n"
        "- chicken breast\n- coffee beans\n- butter\n- spinach")  # fmt: skip
JSON = ('{"name": "Ada Lovelace", "born": 1815, "died": 1852, "field": "mathematics", '
        '"known_for": "the first computer program", "city": "London", '
        '"languages": ["English", "French"]}')  # fmt: skip
PARAGRAPH = ("The river rose slowly through the night, and by morning the lower fields were "
             "under water. The farmers moved their animals to the hill behind the church, where "
             "the ground stayed dry, and waited for the rain to stop. By noon the bridge was "
             "closed, and the school sent the children home early.")  # fmt: skip

TASKS: list[tuple[str, str, str]] = [
    ("edit", "fix this function",
     f"Fix the bug in this function and write out the whole corrected function.\n\n```python\n"
     f"{FUNCTION}```"),
    ("edit", "repeat the list with one change",
     f"Here is a shopping list:\n{LIST}\n\nWrite the same list again, with milk replaced by "
     f"oat milk."),
    ("edit", "translate this JSON's keys",
     f"Here is a JSON object:\n{JSON}\n\nWrite it again with its keys translated into French "
     f"and its values unchanged."),
    ("edit", "quote a paragraph",
     f"Copy this paragraph exactly, word for word:\n\n{PARAGRAPH}"),
    ("edit", "rename a variable",
     f"Rename the variable total to running_sum in this function and write out all of it."
     f"\n\n```python\n{FUNCTION}```"),
    ("prose", "a story", "Write a short story about a lighthouse keeper who finds a message in a "
     "bottle."),
    ("prose", "an explanation", "Explain how a bicycle works to a ten-year-old."),
    ("prose", "an email", "Write a polite email to a colleague asking to move our meeting to "
     "Thursday."),
    ("prose", "a poem", "Write a poem about autumn in a city."),
]  # fmt: skip


FORWARDS = {"n": 0}  # the model's forwards (a prefill chunk, a step or a verification)


def counted(forward):
    def wrapper(*args, **kwargs):
        FORWARDS["n"] += 1
        return forward(*args, **kwargs)

    return wrapper


def run(engine: Engine, ids: list[int], sampling: Sampling) -> dict:
    FORWARDS["n"] = 0
    events = list(engine.stream(ids, sampling))
    stats = events[-1]
    assert isinstance(stats, Stats)
    return {
        "tok_s": stats.decode_tok_s,
        "generated": list(engine.progress.generated),
        "drafted": stats.drafted_tokens,
        "accepted": stats.accepted_tokens,
        "forwards": FORWARDS["n"] - 1,  # the prompt's one chunk left out
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="runs of each task in each mode")
    ap.add_argument("--quick", action="store_true", help="1 rep, 2 tasks of each kind")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--sampling", choices=["greedy", "default"], default="greedy",
                    help="greedy (no penalty, as bench_engine) or the shipped default, seed 0")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    be.GATE["on"] = not args.no_wait
    reps = 1 if args.quick else args.reps
    tasks = [t for t in TASKS if not args.quick or t[1] in (
        "fix this function", "repeat the list with one change", "a story", "an email")]
    if args.sampling == "greedy":
        sampling = Sampling.greedy(args.max_tokens)
    else:
        sampling = Sampling(seed=0, max_tokens=args.max_tokens)
    lm = models.load(progress=False)
    lm.model.forward = counted(lm.model.forward)
    prompt = Prompt(lm.tokenizer)
    ends = prompt.end_token_ids(lm.model.generation_config)
    engines = {
        mode: Engine(lm.model, lm.tokenizer, end_ids=ends, context_length=lm.context_length)
        for mode in ("off", "on")
    }
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; "
          f"{lm.model.describe()}; sampling: {args.sampling}; {reps} run(s) per mode\n")
    print("| kind | task | tokens | off tok/s | on tok/s | ratio | accepted | drafted/token "
          "| tokens/forward | others' cores |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {"edit": [], "prose": []}
    for kind, name, user in tasks:
        ids = prompt.render([{"role": "user", "content": user}])
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for rep in range(reps):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                s = Sampling(**{**vars(sampling), "draft": mode == "on"})
                one = functools.partial(run, engines[mode], ids, s)
                runs[mode].append(be.measured(one))
        if runs["on"][0]["generated"] != runs["off"][0]["generated"]:
            print(f"| {kind} | {name} | DIFFERENT ANSWERS with drafting: a bug |")
            return 1
        off = statistics.median(r["tok_s"] for r in runs["off"])
        on = statistics.median(r["tok_s"] for r in runs["on"])
        drafted = sum(r["drafted"] for r in runs["on"])
        accepted = sum(r["accepted"] for r in runs["on"])
        n = len(runs["on"][0]["generated"])
        forwards = sum(r["forwards"] for r in runs["on"])
        per_forward = sum(len(r["generated"]) for r in runs["on"]) / max(forwards, 1)
        others = max(r["others_cores"] for rs in runs.values() for r in rs)
        ratios[kind].append(on / off if off else 0.0)
        share = f"{accepted / drafted:.0%}" if drafted else "-"
        print(f"| {kind} | {name} | {n} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {share} | "
              f"{drafted / reps / max(n, 1):.2f} | {per_forward:.2f} | {others:.2f} |")  # fmt: skip
    for kind, rs in ratios.items():
        if rs:
            print(f"\n{kind}: geometric mean ratio {statistics.geometric_mean(rs):.2f}x "
                  f"(goal {'>= 2x' if kind == 'edit' else '>= 0.97x'})")  # fmt: skip
    policy = engines["on"].draft_policy
    costs = ", ".join(f"{k} drafted {policy.cost[k - 1]:.2f} ({n}x)"
                      for k, n in enumerate(policy.timings, 1) if n)  # fmt: skip
    print(f"\na verified row's cost in decode steps, by tokens drafted (the policy's measure, "
          f"and how many forwards it is of): {costs}")
    print(f"waited {be.GATE['waited_s']:.0f} s for quiet; {be.GATE['retries']} disturbed runs "
          "redone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
