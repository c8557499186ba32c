#!/usr/bin/env python
"""What drafting could give, apart from the machine: the embedded model's greedy answers to
bench_draft's tasks (computed once, drafting off), then drafting replayed over them with a
verified row at a fixed cost in decode steps: the shipped policy (DraftPolicy, learning over
three passes of all tasks as a session would) against an oracle that drafts exactly the tokens
the lookup would get right, and against the same policy with the rates of matches in the prompt
and in the answer pooled (`--orders`: the tasks in that many orders, the first as listed, the
rest shuffled; the policy's path depends on the order). Tokens per unit of time against plain
decoding, per task: geometric means over the orders.

    flock -s /work/cpu.lock .venv/bin/python bench/draft_sim.py --cost 0.25,0.2 --orders 21

A forward that verifies k drafted tokens costs 1 + cost * k steps; a plain step 1. So the
figures say whether a better policy or a cheaper row would reach a goal (bench_draft.py measures
the real thing). The lookup is the shipped one, recased copies included.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_draft as bd  # noqa: E402

from kvrepl.chat.prompt import Prompt  # noqa: E402
from kvrepl.engine import models  # noqa: E402
from kvrepl.engine.draft import Drafter, Recase  # noqa: E402
from kvrepl.engine.engine import Engine, Sampling  # noqa: E402
from kvrepl.engine.policy import BEFORE, MAX_DRAFT, DraftPolicy  # noqa: E402
from kvrepl.ids import common_prefix  # noqa: E402


class Pooled(DraftPolicy):
    """The policy with one table of rates for every match, wherever it lies (as before)."""

    def size(self, match: int, available: int, source: int = BEFORE) -> int:
        return super().size(match, available, BEFORE)

    def observed(self, match: int, drafted: int, accepted: int, source: int = BEFORE) -> None:
        super().observed(match, drafted, accepted, BEFORE)


def replay(policy: DraftPolicy | None, recase: Recase, ids: list[int], answer: list[int],
           cost: float) -> float:  # fmt: skip
    """The answer's tokens over its time in steps, drafting as `policy` sizes (None: the
    oracle), against one step a token."""
    drafter = Drafter(ids, policy or DraftPolicy(), set(), recase)
    ctx, i, steps = list(ids), 0, 0.0
    while i < len(answer):
        token = answer[i]
        if policy is None:
            drafter.lookup.sync(ctx)
            guess = drafter.lookup.guess(token, MAX_DRAFT)[1]
            guess = guess[: common_prefix(guess, answer[i + 1 :])]
        else:
            guess = drafter.propose(ctx, token, MAX_DRAFT)
            policy.timed(len(guess) + 1, 1.0 + cost * len(guess))
        taken = common_prefix(guess, answer[i + 1 :])
        steps += 1.0 + cost * len(guess)
        ctx += answer[i : i + 1 + taken]
        i += 1 + taken
    return len(answer) / steps


def table(answers: list, rates: dict, recase: Recase, cost: float, orders: int) -> None:
    print(f"\na verified row at {cost} of a step ({orders} orders)\n")
    print("| kind | task | policy | rates pooled | oracle |\n|---|---|---:|---:|---:|")
    got: dict[str, list[tuple[float, float, float]]] = {"edit": [], "prose": []}
    for kind, name, ids, answer in answers:
        p, q = (statistics.geometric_mean(rates[way][name]) for way in ("policy", "pooled"))
        o = replay(None, recase, ids, answer, cost)
        got[kind].append((p, q, o))
        print(f"| {kind} | {name} | {p:.2f}x | {q:.2f}x | {o:.2f}x |")
    for kind, rs in got.items():
        p, q, o = (statistics.geometric_mean(r[i] for r in rs) for i in range(3))
        print(f"\n{kind}: geometric mean, policy {p:.3f}x, pooled {q:.3f}x, oracle {o:.3f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cost", default="0.33,0.25,0.2", help="a verified row's costs, in steps")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--orders", type=int, default=21, help="orders of the tasks replayed")
    args = ap.parse_args(argv)
    lm = models.load(progress=False)
    prompt = Prompt(lm.tokenizer)
    ends = prompt.end_token_ids(lm.model.generation_config)
    engine = Engine(lm.model, lm.tokenizer, end_ids=ends, context_length=lm.context_length)
    sampling = Sampling(**{**vars(Sampling.greedy(args.max_tokens)), "draft": False})
    answers = []
    for kind, name, user in bd.TASKS:
        ids = prompt.render([{"role": "user", "content": user}])
        list(engine.stream(ids, sampling))
        answers.append((kind, name, ids, list(engine.progress.generated)))
    recase = Recase(lm.tokenizer)
    rng = random.Random(0)
    orders = [list(range(len(answers)))]
    orders += [rng.sample(range(len(answers)), len(answers)) for _ in range(args.orders - 1)]
    for cost in (float(c) for c in args.cost.split(",")):
        rates: dict[str, dict[str, list[float]]] = {"policy": {}, "pooled": {}}
        for order in orders:
            for way, make in (("policy", DraftPolicy), ("pooled", Pooled)):
                policy = make()
                for _ in range(2):  # the policy learns as a session's turns would teach it
                    for i in order:
                        replay(policy, recase, answers[i][2], answers[i][3], cost)
                for i in order:
                    got = replay(policy, recase, answers[i][2], answers[i][3], cost)
                    rates[way].setdefault(answers[i][1], []).append(got)
        table(answers, rates, recase, cost, len(orders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
