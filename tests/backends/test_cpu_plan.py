"""explain() names the path the CPU kernel takes. For a grid of calls (prefill, decode with GQA groups of several
sizes and L from 1 to past 8, varlen; strided and heads-inner q, strided keys, contiguous and paged KV caches,
cache_batch_idx), every dtype and every CPU capability this machine runs, the plan explain() prints is the plan of
the forward that then ran: the kernel records it on this thread, with the tile type of the kernel instance it ran on
(pyattn._C._cpu_last_fwd_run). The grid reaches every path on every capability."""
import re
from dataclasses import dataclass, field

import pytest
import torch

import pyattn
from pyattn import _C, backends, cpu_capability
from pyattn.inputs import varlen_inputs

CAPABILITIES = [c for c in cpu_capability.order() if c in cpu_capability.compiled() and cpu_capability.cpu_supports(c)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# the paths by the words of their plan (csrc/cpu/fwd_plan.cpp, describe)
PATHS = {"prefill": "prefill:", "rows": "FMA on the cache's rows", "all heads": "scores of every kv head",
         "direct": "(S^T = K Q^T)", "packed": "packed per key block"}


@dataclass
class Call:
    """One call: fn is "sdpa", "varlen" or "kvcache"; make(dtype) -> its positional tensors and keywords."""
    id: str
    fn: str
    make: callable
    kw: dict = field(default_factory=dict)


def _sdpa(id, q, k, v=None, q_view=None, k_view=None, **kw):
    """q, k, v: shapes (B, H, L, E); q_view / k_view: what the kernel gets of a fresh tensor (strides, layouts)."""
    def make(dtype):
        qt, kt, vt = (torch.randn(s, dtype=dtype) for s in (q, k, v or k))
        return (q_view or (lambda x: x))(qt), (k_view or (lambda x: x))(kt), (k_view or (lambda x: x))(vt)
    return Call(id, "sdpa", make, {"enable_gqa": True, **kw})


def _varlen(id, lens_q, lens_k, Hq, Hkv, E):
    def make(dtype):
        cu_q, cu_k = (torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32) for lens in (lens_q, lens_k))
        q, k, v = torch.randn(sum(lens_q), Hq, E, dtype=dtype), *torch.randn(2, sum(lens_k), Hkv, E, dtype=dtype)
        return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)
    return Call(id, "varlen", make, {"is_causal": True})


def _kvcache(id, B, L, Hq, Hkv, E, seqlens, page_size=None, batch_idx=None):
    """A cache of 2000 positions per sequence, contiguous (with cache_batch_idx rows, if given) or paged."""
    def make(dtype):
        rows = B if batch_idx is None else max(batch_idx) + 1
        q, (kc, vc) = torch.randn(B, L, Hq, E, dtype=dtype), torch.randn(2, rows, 2000, Hkv, E, dtype=dtype)
        kw = {"cache_seqlens": torch.tensor(seqlens, dtype=torch.int32)}
        if page_size:
            kc, vc = (c.reshape(-1, page_size, Hkv, E) for c in (kc, vc))
            kw["block_table"] = torch.randperm(kc.shape[0]).to(torch.int32).reshape(B, -1)
        elif batch_idx is not None:
            kw["cache_batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32)
        return (q, kc, vc), kw
    return Call(id, "kvcache", make)


CALLS = [
    _sdpa("prefill-gqa2", (2, 4, 150, 32), (2, 2, 150, 32), is_causal=True),
    _sdpa("prefill-heads-inner-q", (2, 150, 4, 32), (2, 2, 150, 32), q_view=lambda x: x.transpose(1, 2)),
    _sdpa("decode-L1-mha", (2, 2, 1, 64), (2, 2, 1500, 64)),
    _sdpa("decode-L3-gqa4", (1, 8, 3, 64), (1, 2, 3000, 64)),
    _sdpa("decode-L2-gqa4-strided-q", (1, 8, 2, 128), (1, 2, 700, 64), q_view=lambda x: x[..., ::2]),
    _sdpa("decode-L2-gqa2-strided-k", (1, 4, 2, 64), (1, 2, 900, 128), k_view=lambda x: x[..., ::2]),
    _sdpa("decode-L5-gqa3-E20", (2, 6, 5, 20), (2, 2, 600, 20)),
    _sdpa("decode-L12-gqa8-heads-inner-q", (1, 12, 16, 64), (1, 2, 1100, 64), q_view=lambda x: x.transpose(1, 2)),
    _varlen("varlen-decode", (1, 2, 1), (300, 1100, 40), 4, 2, 64),
    _varlen("varlen-prefill", (100, 60), (100, 200), 4, 2, 32),
    _kvcache("kv-L1-gqa4-batch-idx", 3, 1, 8, 2, 64, [2000, 17, 600], batch_idx=[2, 0, 3]),
    _kvcache("kv-L7-gqa4-batch-idx", 3, 7, 8, 2, 64, [2000, 17, 600], batch_idx=[2, 0, 3]),
    _kvcache("kv-L9-mha", 2, 9, 2, 2, 64, [1900, 300]),
    _kvcache("kv-paged16-L2-gqa4", 4, 2, 8, 2, 64, [2000, 1990, 1900, 2000], page_size=16),
    _kvcache("kv-paged16-L6-gqa4", 4, 6, 8, 2, 64, [2000, 1990, 1900, 2000], page_size=16),
    _kvcache("kv-paged16-L6-gqa4-short", 2, 6, 8, 2, 64, [40, 300], page_size=16),
    _kvcache("kv-paged5-L3-gqa2-E20", 2, 3, 4, 2, 20, [999, 1200], page_size=5),
    _kvcache("kv-paged16-L40-gqa4", 2, 40, 8, 2, 64, [2000, 700], page_size=16),
]


@pytest.fixture(autouse=True)
def _two_threads():
    """The kv heads a decode task takes depend on the thread count: two threads reach every path with this grid."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def explained(call, dtype):
    """-> (the plan explain() names for the call, the call itself)."""
    torch.manual_seed(0)
    if call.fn == "sdpa":
        q, k, v = call.make(dtype)
        text = pyattn.explain(q, k, v, backend="cpu", **call.kw)
        run = lambda: pyattn.scaled_dot_product_attention(q, k, v, backend="cpu", **call.kw)  # noqa: E731
    elif call.fn == "varlen":
        args = call.make(dtype)
        text = backends.explain_inputs(varlen_inputs(*args, **call.kw), "cpu")
        run = lambda: pyattn.varlen_attention(*args, backend="cpu", **call.kw)  # noqa: E731
    else:
        args, kw = call.make(dtype)
        text = pyattn.explain(*args, backend="cpu", **kw)
        run = lambda: pyattn.kvcache_attention(*args, backend="cpu", **kw)  # noqa: E731
    line = next(x for x in text.splitlines() if x.strip().startswith("cpu "))
    return re.search(r"forward: (.*)\]$", line).group(1), run


def path_of(plan):
    (name,) = [name for name, words in PATHS.items() if words in plan]
    return name


@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("capability", [pytest.param(c, marks=pytest.mark.cpu_capability(c)) for c in CAPABILITIES])
def test_explain_names_the_path_taken(capability, dtype, call):
    plan, run = explained(call, dtype)
    _C._cpu_last_fwd_run()  # clears the record
    run()
    assert _C._cpu_last_fwd_run() == plan


@pytest.mark.parametrize("capability", [pytest.param(c, marks=pytest.mark.cpu_capability(c)) for c in CAPABILITIES])
def test_the_grid_reaches_every_path(capability):
    seen = {path_of(explained(call, dtype)[0]) for call in CALLS for dtype in DTYPES.values()}
    assert seen == set(PATHS)
