#!/usr/bin/env python
"""What drafting could give, apart from the machine: the embedded model's greedy answers to
bench_draft's tasks (computed once, drafting off), then drafting replayed over them with a
verified row at a fixed cost in decode steps: the shipped policy (DraftPolicy, learning over
three passes of all tasks as a session would) against an oracle that drafts exactly the tokens
the lookup would get right. Tokens per unit of time against plain decoding, per task.

    flock -s /work/cpu.lock .venv/bin/python bench/draft_sim.py --cost 0.33,0.25,0.2

A forward that verifies k drafted tokens costs 1 + cost * k steps; a plain step 1. So the
figures say whether a better policy or a cheaper row would reach a goal (bench_draft.py measures
the real thing). The lookup is the shipped one, recased copies included.
"""

from __future__ import annotations

import argparse
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
from kvrepl.engine.policy import MAX_DRAFT, DraftPolicy  # noqa: E402
from kvrepl.ids import common_prefix  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cost", default="0.33,0.25,0.2", help="a verified row's costs, in steps")
    ap.add_argument("--max-tokens", type=int, default=200)
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
    for cost in (float(c) for c in args.cost.split(",")):
        policy = DraftPolicy()
        for _ in range(2):  # the policy learns as a session's turns would teach it
            for _kind, _name, ids, answer in answers:
                replay(policy, recase, ids, answer, cost)
        print(f"\na verified row at {cost} of a step\n\n| kind | task | policy | oracle |")
        print("|---|---|---:|---:|")
        got: dict[str, list[tuple[float, float]]] = {"edit": [], "prose": []}
        for kind, name, ids, answer in answers:
            p = replay(policy, recase, ids, answer, cost)
            o = replay(None, recase, ids, answer, cost)
            got[kind].append((p, o))
            print(f"| {kind} | {name} | {p:.2f}x | {o:.2f}x |")
        for kind, rs in got.items():
            print(f"\n{kind}: geometric mean, policy "
                  f"{statistics.geometric_mean(r[0] for r in rs):.2f}x, oracle "
                  f"{statistics.geometric_mean(r[1] for r in rs):.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
