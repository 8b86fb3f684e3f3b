"""What pyattn.enable() costs per call: torch.nn.functional.scaled_dot_product_attention routed to pyattn against
pyattn's function called directly, on small shapes where a per-call cost would show (torch's own for scale).

`pytest benchmarks/test_routing_overhead.py`; not part of `make test`: speed is measured here, never asserted.
"""
import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.backends import TORCH_SDPA

SHAPES = [pytest.param((1, 8, 16, 64), id="B1-H8-N16-D64"), pytest.param((1, 8, 128, 64), id="B1-H8-N128-D64")]
IMPLS = {
    "torch-sdpa": lambda q, k, v: TORCH_SDPA(q, k, v, is_causal=True),
    "pyattn-direct": lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True),
    "pyattn-routed": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES)
def test_call_overhead(benchmark, impl, shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape) for _ in range(3))
    benchmark.group = f"routing {shape}"
    with pyattn.enabled(), torch.no_grad():
        benchmark(IMPLS[impl], q, k, v)
