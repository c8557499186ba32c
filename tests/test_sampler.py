"""The sampler (sampler.py) on a vocabulary of the embedded model's size: the CPU's candidate
path (top-k prefilter, a tail beyond it, a second tier, the full sort as the last resort) draws
from exactly the distribution that temperature, top-k, top-p and the repetition penalty define,
computed here in float64 from the definition; greedy is the penalized argmax."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from chisq import critical, fit

from kvrepl.engine.engine import Sampling
from kvrepl.engine.sampler import CANDIDATES, Sampler

VOCAB = 49_152


def zipf_logits(seed: int, vocab: int = VOCAB, slope: float = 1.2, noise: float = 0.3):
    """Logits shaped like a language model's: log-probabilities falling with rank, the ranks
    scattered over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ranked = -slope * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    ranked += noise * torch.randn(vocab, generator=g, dtype=torch.float64)
    return ranked[torch.randperm(vocab, generator=g)].float()


def reference(logits: torch.Tensor, s: Sampling, recent: list[int]) -> dict[int, float]:
    """The distribution by definition, in float64: penalty, temperature, top-k (ties at the
    k-th kept), top-p (the smallest set of the likeliest that reaches it), softmax."""
    x = logits.double().clone()
    if s.repetition_penalty != 1.0 and recent:
        idx = torch.tensor(sorted(set(recent)))
        v = x[idx]
        x[idx] = torch.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    x /= s.temperature
    if s.top_k > 0:
        kth = torch.topk(x, s.top_k).values[-1]
        x[x < kth] = float("-inf")
    if 0 < s.top_p < 1:
        order = torch.argsort(x, descending=True, stable=True)
        p = torch.softmax(x[order], 0)
        drop = p.cumsum(0) - p > s.top_p
        x[order[drop]] = float("-inf")
    p = torch.softmax(x, 0)
    nz = torch.nonzero(p > 0).flatten()
    return dict(zip(nz.tolist(), p[nz].tolist(), strict=True))


def draws(s: Sampling, logits: torch.Tensor, recent: list[int], n: int) -> Counter:
    sampler = Sampler(s, logits.numel(), torch.device("cpu"))
    sampler.seen(recent)
    return Counter(sampler.next(logits) for _ in range(n))


def assert_fits(s: Sampling, logits: torch.Tensor, recent: list[int], n: int = 4000) -> dict:
    want = reference(logits, s, recent)
    got = draws(s, logits, recent, n)
    stat, df = fit(got, want)
    assert stat < critical(df), f"chi-square {stat:.1f} over {df} df (limit {critical(df):.1f})"
    return want


def with_head(logits: torch.Tensor, n: int = 12, lift: float = 3.0) -> torch.Tensor:
    """The likeliest n tokens lifted clear of the rest, as a confident model's are."""
    out = logits.clone()
    out[torch.topk(logits, n).indices] += lift
    return out


CASES = {
    # the shipped default: the kept set is a few of the 64 candidates
    "default": (Sampling(seed=1), zipf_logits(0, slope=0.4)),
    # ... with the rest far below: their weight is bounded, never summed
    "default, clear head": (Sampling(seed=7), with_head(zipf_logits(6, slope=0.15))),
    # no top-p at temperature 1: draws beyond the candidates (the tail) come a third of the time
    "tail": (Sampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=2),
             zipf_logits(1)),
    # a flatter distribution: top-p reaches past 64 but within 1,024
    "second tier": (Sampling(temperature=1.0, top_p=0.9, seed=3), zipf_logits(2, slope=1.4)),
    # flatter still: past 1,024 too, the full sort decides
    "full sort": (Sampling(temperature=1.0, top_p=0.95, seed=4),
                  zipf_logits(3, vocab=4096, slope=0.3)),
    "top-k": (Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=5), zipf_logits(4)),
    "top-k, no top-p": (Sampling(temperature=1.3, top_k=50, top_p=1.0, seed=6), zipf_logits(5)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_draws_follow_the_defined_distribution(case):
    s, logits = CASES[case]
    recent = torch.topk(logits, 8).indices.tolist()[::2] + [7, 7, 11]  # the penalty matters
    want = assert_fits(s, logits, recent)
    kept = len(want)
    if case == "tail":  # the test does reach beyond the candidates, often
        top = set(torch.topk(logits, CANDIDATES[0]).indices.tolist())
        assert sum(p for t, p in want.items() if t not in top) > 0.2
    if case == "second tier":
        assert CANDIDATES[0] < kept <= CANDIDATES[1]
    if case == "full sort":
        assert kept > CANDIDATES[1]


def test_a_tie_at_the_kth_keeps_every_tied_token():
    logits = torch.full((VOCAB,), -5.0)
    logits[[10, 20, 30, 40, 50]] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0])
    s = Sampling(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0, seed=0)
    want = assert_fits(s, logits, [])
    assert set(want) == {10, 20, 30, 40, 50}


def test_greedy_is_the_penalized_argmax_and_a_seed_repeats_its_draws():
    logits = zipf_logits(9) + 10  # positive: the penalty divides the top one by 5
    top2 = torch.topk(logits, 2).indices.tolist()
    s = Sampler(Sampling(temperature=0, repetition_penalty=5.0), VOCAB, torch.device("cpu"))
    assert s.next(logits) == top2[0]
    s.seen([top2[0]])
    assert s.next(logits) == top2[1]
    a = draws(Sampling(temperature=1.0, seed=11), logits, [], 50)
    assert a == draws(Sampling(temperature=1.0, seed=11), logits, [], 50)
    assert a != draws(Sampling(temperature=1.0, seed=12), logits, [], 50)


def test_a_step_leaves_the_callers_logits_as_they_were():
    logits = zipf_logits(3)
    before = logits.clone()
    for s in (Sampling(seed=0), Sampling(temperature=1.0, top_p=1.0, seed=0), Sampling(top_k=5)):
        sampler = Sampler(s, VOCAB, torch.device("cpu"))
        sampler.seen(torch.topk(logits, 3).indices.tolist())
        for _ in range(20):
            sampler.next(logits)
    assert torch.equal(logits, before)
