"""The matmul over several rows of x (a verification of drafted tokens: up to 16 rows through the
loop that unpacks each weight block once for all of them, issue 19) gives every row bit for bit
what that row alone gives, at any thread count and on every instruction set (scalar, AVX2,
AVX-512), on rows given as they are and in the kernels' groups of 16 (with rows of padding: 24
rows), scales in float32 or float16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fastpath import every_kind, matmul

from kvrepl.backends.cpu import native
from kvrepl.backends.cpu.quant import Packed
from kvrepl.engine import models


@pytest.fixture(scope="module")
def builds() -> dict[str, native.Kernels]:
    out = {"default": native.kernels(models.cache_dir())}
    for isa in ("avx2", "scalar"):
        out[isa] = native.kernels(models.cache_dir(), native.flags_for(isa))
    return out


def weights() -> list[tuple[str, Packed]]:
    out = []
    for name, p in every_kind(24, 288, np.random.default_rng(11)).items():
        out += [(name, p), (name + "/lanes", p.interleaved())]
        h = Packed(p.fmt, p.q, p.sc.half().float(), p.n, p.k, p.block)  # stored as float16
        out += [(name + "/f16", h), (name + "/lanes/f16", h.interleaved())]
    assert out[-1][1].sc.dtype == torch.float16 and out[-3][1].sc.dtype == torch.float32
    return out


def test_groups_of_16_are_a_byte_order_of_the_rows():
    for name, p in weights():
        if p.group == 16:
            assert torch.equal(p.canonical().q, every_q(name)), name
            assert torch.equal(p.dequantize(), p.canonical().dequantize()), name


def every_q(name: str) -> torch.Tensor:
    base = name.removesuffix("/f16").removesuffix("/lanes")
    return every_kind(24, 288, np.random.default_rng(11))[base].q


def test_each_row_of_a_multi_row_matmul_is_that_row_alone(builds):
    torch.manual_seed(5)
    x = torch.randn(17, 288) * torch.logspace(-2, 2, 17).unsqueeze(1)
    try:
        for threads in (1, 2, 3):
            for k in builds.values():
                k.set_threads(adapt=False, fixed=threads)
            for name, p in weights():
                alone = torch.cat([matmul(builds["scalar"], x[m : m + 1].contiguous(), p)
                                   for m in range(17)])  # fmt: skip
                for isa, k in builds.items():
                    for rows in (2, 3, 4, 5, 7, 8, 9, 15, 16, 17):
                        got = matmul(k, x[:rows].contiguous(), p)
                        assert torch.equal(got, alone[:rows]), (name, isa, threads, rows)
    finally:
        for k in builds.values():
            k.set_threads(adapt=True, fixed=0)


def test_the_test_can_fail(builds):
    """A changed weight changes the rows that use it: the comparison above is not vacuous."""
    name, p = weights()[1]
    q = p.q.clone()
    q.view(-1)[0] ^= 1
    other = Packed(p.fmt, q, p.sc, p.n, p.k, p.block, p.group, dd=p.dd, mins=p.mins)
    x = torch.randn(8, 288)
    assert not torch.equal(matmul(builds["default"], x, p), matmul(builds["default"], x, other))
