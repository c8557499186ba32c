"""The kernels' threads (native/pool.c) and instruction sets: a forward's logits and K/V are
bit-identical whatever the number of threads (1, 2 or 3, set as kvrepl sets it, with
torch.set_num_threads), on the tiny model through gguf_model.from_hf and on the real SmolLM2
GGUF, with the pool's workers really taking part; the thread count follows torch's, and drops
while another process keeps a core busy; AVX-512 (where the CPU has it), AVX2 and the scalar
fallback agree bit for bit over 600+ tokens, across several 256-key attention blocks (with 16-bit
and with 8-bit K/V); and torch's OpenMP threads are kept from spinning unless the user chose a
wait policy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.gguf_model import from_hf
from kvrepl.engine import models

Run = tuple[list[torch.Tensor], list]


def run(model, chunks: list[list[int]]) -> Run:
    """Logits after each chunk (a prefill chunk or a one-token decode step), and the cache."""
    layers = model.new_layers()
    return [model.forward(c, layers) for c in chunks], layers


def assert_same(a: Run, b: Run) -> None:
    assert len(a[0]) == len(b[0])
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for la, lb in zip(a[1], b[1], strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def chunks_of(ids: list[int], prefill: int, steps: int) -> list[list[int]]:
    """A prefill chunk, one-token steps, then the rest as a second chunk."""
    end = prefill + steps
    return [ids[:prefill]] + [[i] for i in ids[prefill:end]] + [ids[end:]]


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    return native.kernels(models.cache_dir())


@pytest.fixture
def pinned(kernels) -> Iterator[native.Kernels]:
    """Not adapting to the machine's load: as many threads as torch is asked for."""
    kernels.set_threads(adapt=False)
    yield kernels
    kernels.set_threads(adapt=True)


def by_threads(model, chunks: list[list[int]], k: native.Kernels) -> dict[int, Run]:
    out = {}
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        assert k.threads() == t
        before = k.worker_items()
        out[t] = run(model, chunks)
        if t == 1:
            assert k.worker_items() == before  # one thread: the caller ran every item
    return out


def test_the_tiny_model_computes_the_same_bits_on_any_number_of_threads(tiny, pinned):
    model, tok = tiny
    fast = from_hf(model, "Q4_1", pinned, 512)
    ids = torch.randint(0, len(tok), (400,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = by_threads(fast, chunks_of(ids, 300, 40), pinned)
    assert_same(runs[2], runs[1])
    assert_same(runs[3], runs[1])


@pytest.mark.model
def test_smollm2_computes_the_same_bits_on_any_number_of_threads(real, pinned):
    assert real.model.k is pinned  # the kernels the product loaded
    ids = real.tokenizer("The lighthouse keeper counted the waves. " * 80)["input_ids"][:560]
    assert len(ids) == 560
    before = pinned.worker_items()
    runs = by_threads(real.model, chunks_of(ids, 500, 12), pinned)
    assert pinned.worker_items() > before  # with 2 and 3 threads, the workers took items
    assert_same(runs[2], runs[1])
    assert_same(runs[3], runs[1])


def test_the_thread_count_is_torchs_unless_told(pinned):
    torch.set_num_threads(3)
    assert pinned.threads() == 3
    torch.set_num_threads(1)
    assert pinned.threads() == 1
    pinned.set_threads(adapt=False, fixed=2)
    assert pinned.threads() == 2


def test_a_core_kept_busy_by_another_process_takes_a_thread_away(kernels):
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2 or not os.path.exists("/proc/stat"):
        pytest.skip("one CPU, or no /proc/stat to measure the others' load with")
    torch.set_num_threads(cpus)
    spin = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    with subprocess.Popen([sys.executable, "-c", spin]) as spinner:
        try:
            time.sleep(0.3)
            kernels.threads()  # the load is measured from here...
            time.sleep(0.5)
            busy = kernels.threads()  # ...to here
        finally:
            spinner.kill()
    assert 1 <= busy <= cpus - 1


# ---------------------------------------------------------------------------------------------
# instruction sets


@pytest.fixture(scope="module")
def variants(kernels) -> dict[str, native.Kernels]:
    """The default build (AVX-512 where the CPU has it), and the AVX2 and scalar builds."""
    if kernels.isa == "scalar":
        pytest.skip("this machine has no vector kernels to compare with")
    out = {"default": kernels}
    for isa in ("avx2", "scalar"):
        out[isa] = native.kernels(models.cache_dir(), native.flags_for(isa))
        assert out[isa].isa == isa
    return out


def smollm_shaped(vocab: int):
    """A small random Llama with SmolLM2's attention shape (heads of 64, 3 per K/V head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                      max_position_embeddings=1024, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def fast(model, k: native.Kernels, kv_bits: int):
    f = from_hf(model, "Q4_1", k, 1024)
    f.kv_bits = kv_bits
    return f


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_every_instruction_set_agrees_over_700_tokens(variants, kv_bits):
    model = smollm_shaped(512)
    ids = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(9)).tolist()
    chunks = chunks_of(ids, 530, 20)  # keys in blocks 0-2; the steps cross the block at 512
    runs = {name: run(fast(model, k, kv_bits), chunks) for name, k in variants.items()}
    assert_same(runs["avx2"], runs["scalar"])
    assert_same(runs["default"], runs["scalar"])


@pytest.mark.model
def test_smollm2_agrees_with_avx2_over_650_tokens(real, variants):
    """The real weights (Q4_1 and Q8_0) on the default build and on AVX2 (the scalar build is
    compared above on a small model: it would take a minute here)."""
    if variants["default"].isa == "avx2":
        pytest.skip("the default build is the AVX2 one here")
    ids = real.tokenizer("A storm came in over the rocks that night. " * 70)["input_ids"][:650]
    assert len(ids) == 650
    # 3 blocks of keys: the steps cross the block at 512, some carry 3 or 2 tokens (drafts)
    steps = [[i] for i in ids[500:520]] + [ids[520:523], ids[523:525]]
    chunks = [ids[:500], *steps, ids[525:]]
    model, default = real.model, real.model.k
    want = run(model, chunks)
    try:
        model.k = variants["avx2"]
        assert_same(run(model, chunks), want)
    finally:
        model.k = default


PARKED = """
import ctypes, time, torch
from kvrepl.engine import models
from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.quant import quantize
k = native.kernels(models.cache_dir())
torch.set_num_threads(2)
w = quantize(torch.randn(256, 256), "Q8_0").interleaved()
x, out = torch.randn(64, 256), torch.empty(64, 256)
d = native.weight(w.fmt, w.q, w.sc, w.n, w.k, w.block, w.group)
k.matmul(x.data_ptr(), 64, 256, ctypes.byref(d), out.data_ptr(), 256, None, 0)
for _ in range(200):  # the team forms in a thread of its own
    if k.parked_openmp():
        break
    time.sleep(0.01)
print(k.parked_openmp())
"""


@pytest.mark.parametrize(("env", "want"), [({}, "2"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "0")])
def test_torchs_openmp_threads_are_told_not_to_spin_unless_the_user_chose(env, want):
    """libgomp spins 10 ms after each of torch's regions unless it manages more threads than
    CPUs: the first job parks a team of two while torch has several threads (whatever number
    the job runs on), unless the user set a wait policy (read when torch loads libgomp)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", PARKED], env=clean | env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == want
