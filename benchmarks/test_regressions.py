"""pytest-benchmark cases on a small fixed shape set, for `pytest benchmarks --benchmark-compare`.

Not part of `make test` (testpaths = tests): speed is measured here, never asserted in tests.
"""
import pytest
import torch
import torch.nn.functional as F

import pyattn

SHAPES = [pytest.param((1, 8, 1024, 64), id="B1-H8-N1024-D64"), pytest.param((1, 4, 4096, 64), id="B1-H4-N4096-D64")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
IMPLS = {
    "pyattn-cpu": lambda q, k, v, c: pyattn.scaled_dot_product_attention(q, k, v, is_causal=c, backend="cpu"),
    "torch-sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
}


def _inputs(shape, dtype, requires_grad=False):
    torch.manual_seed(0)
    return [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(benchmark, impl, causal, dtype, shape):
    q, k, v = _inputs(shape, dtype)
    benchmark.group = f"fwd {shape} {dtype} causal={causal}"
    with torch.no_grad():
        benchmark(IMPLS[impl], q, k, v, causal)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES[:1])
def test_forward_backward(benchmark, impl, causal, shape):
    q, k, v = _inputs(shape, torch.float32, requires_grad=True)
    benchmark.group = f"fwd+bwd {shape} causal={causal}"

    def step():
        IMPLS[impl](q, k, v, causal).sum().backward()
    benchmark(step)
