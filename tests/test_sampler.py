"""The sampler (sampler.py) on a vocabulary of the embedded model's size: each of the CPU's paths
(the tokens near the top, torch.topk's likeliest, a tail beyond either, the full sort as the last
resort) and the device path draw from exactly the distribution that temperature, top-k, top-p
and the repetition penalty define, computed here in float64 from the definition; greedy is the
penalized argmax, bit for bit as torch computes it."""

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


class Spied(Sampler):
    """A sampler that counts which of its paths gave each token (`paths`)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.paths: Counter = Counter()
        for name in ("_near", "_likeliest", "_tail", "_full"):
            setattr(self, name, self._spy(name, getattr(self, name)))

    def _spy(self, name, method):
        def spied(*args):
            out = method(*args)
            if out is not None:
                self.paths[name] += 1
            return out

        return spied


class OnDevice(Spied):
    """The path a GPU takes (torch on the device), here on the CPU."""

    def next_tensor(self, logits: torch.Tensor) -> torch.Tensor:
        x = self._copy(logits)
        self._penalize(x)
        if self.s.temperature <= 0:
            return torch.argmax(x)
        return self._full(x.div_(self.s.temperature))


def draws(s: Sampling, logits: torch.Tensor, recent: list[int], n: int, cls=Spied):
    sampler = cls(s, logits.numel(), torch.device("cpu"))
    sampler.seen(recent)
    got = Counter(int(sampler.next_tensor(logits)) for _ in range(n))
    return (got, sampler.paths) if cls is not Sampler else got


def assert_fits(s: Sampling, logits: torch.Tensor, recent: list[int], n: int = 4000,
                cls=Spied) -> tuple[dict, Counter]:  # fmt: skip
    want = reference(logits, s, recent)
    got, paths = draws(s, logits, recent, n, cls)
    stat, df = fit(got, want)
    assert stat < critical(df), f"chi-square {stat:.1f} over {df} df (limit {critical(df):.1f})"
    return want, paths


def with_head(logits: torch.Tensor, n: int = 12, lift: float = 3.0) -> torch.Tensor:
    """The likeliest n tokens lifted clear of the rest, as a confident model's are."""
    out = logits.clone()
    out[torch.topk(logits, n).indices] += lift
    return out


CASES = {
    # the shipped default on a confident head: the tokens near the top decide
    "default": (Sampling(seed=1), with_head(zipf_logits(0, slope=0.4), lift=6.0), "_near"),
    # ... a flat one: too many near the top, torch.topk's decide
    "default, flat": (Sampling(seed=7), zipf_logits(6, slope=0.4), "_likeliest"),
    "near, top-k": (Sampling(top_k=5, seed=8), with_head(zipf_logits(7, slope=0.4), lift=6.0),
                    "_near"),
    "near, no top-p": (Sampling(top_p=1.0, seed=9), with_head(zipf_logits(8, slope=0.4), 40, 5.0),
                       "_near"),
    # no top-p at temperature 1: draws beyond the candidates (the tail) come a fifth of the time
    "tail": (Sampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=2),
             zipf_logits(1, slope=1.0), "_likeliest"),
    # a flatter distribution: top-p reaches past the near ones, within torch.topk's
    "likeliest": (Sampling(temperature=1.0, top_p=0.9, seed=3), zipf_logits(2, slope=1.4),
                  "_likeliest"),
    # flatter still: past 1,024 too, the full sort decides
    "full sort": (Sampling(temperature=1.0, top_p=0.95, seed=4),
                  zipf_logits(3, vocab=4096, slope=0.3), "_full"),
    "top-k": (Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=5), zipf_logits(4),
              "_likeliest"),
    "top-k, no top-p": (Sampling(temperature=1.3, top_k=50, top_p=1.0, seed=6), zipf_logits(5),
                        "_likeliest"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_draws_follow_the_defined_distribution(case):
    s, logits, path = CASES[case]
    recent = torch.topk(logits, 8).indices.tolist()[::2] + [7, 7, 11]  # the penalty matters
    want, paths = assert_fits(s, logits, recent)
    assert paths[path] > 0.7 * sum(paths.values()) - paths["_tail"], paths  # the path meant
    kept = len(want)
    if case == "tail":  # the test does reach beyond the candidates, often
        assert paths["_tail"] > 400, paths
    if case == "likeliest":
        assert 64 < kept <= CANDIDATES[1]
    if case == "full sort":
        assert kept > CANDIDATES[1]


@pytest.mark.parametrize("case", ["default", "tail", "top-k"])
def test_the_device_path_draws_the_same_distribution(case):
    s, logits, _ = CASES[case]
    recent = torch.topk(logits, 8).indices.tolist()[::2] + [7, 7, 11]
    _, paths = assert_fits(s, logits, recent, n=2000, cls=OnDevice)
    assert paths == Counter(_full=2000)


def test_the_check_fails_a_wrong_distribution():
    """The chi-square check can fail: a sampler that ignores the penalty is caught."""
    s, logits, _ = CASES["default"]
    recent = torch.topk(logits, 8).indices.tolist()[::2]
    want = reference(logits, s, recent)
    got, _ = draws(s, logits, [], 4000)
    stat, df = fit(got, want)
    assert stat > critical(df)


@pytest.mark.parametrize(("temperature", "path"), [(1.0, "_full"), (0.2, "_near")])
def test_a_tie_at_the_kth_keeps_every_tied_token(temperature, path):
    logits = torch.full((VOCAB,), -5.0)
    logits[[10, 20, 30, 40, 50]] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0])
    s = Sampling(temperature=temperature, top_k=3, top_p=1.0, repetition_penalty=1.0, seed=0)
    want, paths = assert_fits(s, logits, [])
    assert set(want) == {10, 20, 30, 40, 50}
    assert set(paths) == {path}


def test_greedy_is_the_penalized_argmax_and_a_seed_repeats_its_draws():
    logits = zipf_logits(9) + 10  # positive: the penalty divides the top one by 5
    top2 = torch.topk(logits, 2).indices.tolist()
    s = Sampler(Sampling(temperature=0, repetition_penalty=5.0), VOCAB, torch.device("cpu"))
    assert int(s.next_tensor(logits)) == top2[0]
    s.seen([top2[0]])
    assert int(s.next_tensor(logits)) == top2[1]
    a = draws(Sampling(temperature=1.0, seed=11), logits, [], 50)
    assert a == draws(Sampling(temperature=1.0, seed=11), logits, [], 50)
    assert a[0] != draws(Sampling(temperature=1.0, seed=12), logits, [], 50)[0]


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.3, 0.8])
def test_greedy_is_torchs_penalized_argmax_bit_for_bit(penalty):
    """The host path (numpy, in place) picks what torch's penalty and argmax pick, on logits
    with near ties, and leaves them as they were."""
    s = Sampler(Sampling(temperature=0, repetition_penalty=penalty), VOCAB, torch.device("cpu"))
    g = torch.Generator().manual_seed(int(penalty * 10))
    for step in range(200):
        logits = (torch.randn(VOCAB, generator=g) * 4).round(decimals=1)  # ties happen
        window = torch.topk(logits, 30).indices[torch.randperm(30, generator=g)[:10]].tolist()
        s.seen(window)
        x = logits.clone()
        idx = torch.tensor(sorted(set(s.recent)))
        x[idx] = torch.where(x[idx] > 0, x[idx] / penalty, x[idx] * penalty)
        before = logits.clone()
        assert int(s.next_tensor(logits)) == int(torch.argmax(x)), step
        assert torch.equal(logits, before)


def test_a_step_leaves_the_callers_logits_as_they_were():
    logits = zipf_logits(3)
    before = logits.clone()
    for s in (Sampling(seed=0), Sampling(temperature=1.0, top_p=1.0, seed=0), Sampling(top_k=5)):
        sampler = Sampler(s, VOCAB, torch.device("cpu"))
        sampler.seen(torch.topk(logits, 3).indices.tolist())
        for _ in range(20):
            int(sampler.next_tensor(logits))
    assert torch.equal(logits, before)
