"""torch.compile(fullgraph=True) traces pyattn with sizes torch learns only at run time: unbacked sizes (from .item(),
nonzero(), torch._dynamo's mark_unbacked) and dynamic ones, directly and through pyattn.enable(), wherever torch's
own SDPA traces them, and with an unbacked sequence length, which torch's SDPA cannot trace."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.decorators import mark_unbacked

import pyattn

X = (3, 2, 16, 8)  # (B, H, L, E)


def through(entry):
    """The SDPA that the compiled function calls: pyattn's, or torch's name routed by pyattn.enable()."""
    if entry == "pyattn":
        return pyattn.scaled_dot_product_attention
    return lambda *args, **kwargs: F.scaled_dot_product_attention(*args, **kwargs)


def rows_from_item(sdpa):
    def f(x):
        n = torch.tensor(2).item()  # unbacked batch
        torch._check(n >= 0)
        torch._check(n <= x.shape[0])
        q = x[:n]
        return sdpa(q, q * 2, q + 1, is_causal=True)
    return f


def length_from_item(sdpa):
    def f(x):
        n = torch.tensor(10).item()  # unbacked sequence length
        torch._check(n >= 0)
        torch._check(n <= x.shape[2])
        q = x[:, :, :n]
        return sdpa(q, q * 2, q + 1, is_causal=True)
    return f


def rows_from_nonzero(sdpa):
    def f(x):
        q = x[(x[:, 0, 0, 0] > -1e9).nonzero().squeeze(1)]  # every row, an unbacked count
        return sdpa(q, q, q)
    return f


def empty_of_unbacked_length(sdpa):
    def f(x):
        n = torch.tensor(5).item()
        torch._check(n >= 0)
        q = x.new_ones(1, 2, n, 8)
        return sdpa(q, q, q)
    return f


def same_tensor(sdpa, **kwargs):
    def f(q):
        return sdpa(q, q * 2, q + 1, **kwargs)
    return f


def gqa(sdpa):
    def f(q):
        return sdpa(q, q[:, :1], q[:, :1], enable_gqa=True)
    return f


# id -> (function of an sdpa, dims of the input to mark unbacked, mark dynamic instead, does torch's own SDPA trace it)
CASES = {
    "batch-from-item": (rows_from_item, (), False, True),
    "batch-from-nonzero": (rows_from_nonzero, (), False, True),
    "length-from-item": (length_from_item, (), False, False),
    "empty-of-unbacked-length": (empty_of_unbacked_length, (), False, False),
    "unbacked-batch": (same_tensor, (0,), False, True),
    "unbacked-batch-gqa": (gqa, (0,), False, True),
    "unbacked-length": (same_tensor, (2,), False, False),
    "dynamic-batch-and-length": (same_tensor, (0, 2), True, True),
}


def compiled(case, sdpa):
    make, dims, dynamic, _ = CASES[case]
    x = torch.randn(X)
    for d in dims:
        (torch._dynamo.mark_dynamic if dynamic else mark_unbacked)(x, d)
    torch._dynamo.reset()
    return torch.compile(make(sdpa), fullgraph=True, backend="aot_eager")(x)


@pytest.fixture(autouse=True)
def _scalar_outputs(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", True)


@pytest.mark.parametrize("entry", ["pyattn", "enabled"])
@pytest.mark.parametrize("case", list(CASES))
def test_traces_where_torch_does(case, entry):
    torch.manual_seed(0)
    expected = CASES[case][0](F.scaled_dot_product_attention)(torch.randn(X))
    torch.manual_seed(0)
    if entry == "enabled":
        with pyattn.enabled():
            out = compiled(case, through(entry))
    else:
        out = compiled(case, through(entry))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("case", [c for c, (*_, torch_traces) in CASES.items() if torch_traces])
def test_torch_traces_these_too(case):
    """The cases said to trace with torch's SDPA do: the parity above is measured against a real bar."""
    torch.manual_seed(0)
    compiled(case, F.scaled_dot_product_attention)
