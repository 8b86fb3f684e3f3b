"""The Triton kernels' KV-cache mode (pyattn::triton_kvcache_fwd) and attention sinks, against the reference in
float64 (tolerance: FlashAttention's rule, conftest.assert_close_to_oracle). Caches come contiguous, with
cache_batch_idx, or paged with page sizes 1, 16 and one page spanning the whole capacity; the paged and contiguous
runs of the same keys must agree exactly (the same key blocks in the same order, only the addressing differs).
Runs on CUDA, or on CPU tensors under the interpreter (small shapes, fp32/fp16)."""
from dataclasses import dataclass

import pytest
import torch

import pyattn
from helpers import assert_close_to_oracle, backend_params, check_fwd_bwd, dtype_id, paged_caches
from pyattn.kvcache import explain_kvcache
from pyattn.op_args import KVCacheArgs

pytestmark = pytest.mark.parametrize("backend,device", backend_params(["triton"]))

CAPACITY = 96  # cache positions per sequence: > 2 key blocks of the interpreter's tiles, so decoding splits
DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class Cache:
    id: str
    seqlens: tuple  # cache_seqlens per sequence (before the k_new append)
    L: int = 1  # queries (L_new)
    Hq: int = 4
    Hkv: int = 2
    E: int = 16
    causal: bool = True
    window: tuple = None
    softcap: float = None
    alibi: bool = False
    sinks: bool = False
    leftpad: tuple = None
    append: bool = False  # k_new/v_new of L tokens written into the cache first

    def make(self, device, seed=0):
        """Float32 values: q (B, L, Hq, E), a contiguous cache (B, CAPACITY, Hkv, E) per K and V, side inputs."""
        g = torch.Generator().manual_seed(seed)
        B = len(self.seqlens)
        t = {"q": torch.randn(B, self.L, self.Hq, self.E, generator=g),
             "k_cache": torch.randn(B, CAPACITY, self.Hkv, self.E, generator=g),
             "v_cache": torch.randn(B, CAPACITY, self.Hkv, self.E, generator=g),
             "cache_seqlens": torch.tensor(self.seqlens, dtype=torch.int32)}
        if self.append:
            t["k_new"] = torch.randn(B, self.L, self.Hkv, self.E, generator=g)
            t["v_new"] = torch.randn(B, self.L, self.Hkv, self.E, generator=g)
        if self.alibi:
            t["alibi_slopes"] = torch.rand(B, self.Hq, generator=g) * 0.5 + 0.05
        if self.sinks:  # fp16-exact, so every dtype sees the same logits
            t["sinks"] = (torch.randn(self.Hq, generator=g) * 2).half().float()
        if self.leftpad is not None:
            t["cache_leftpad"] = torch.tensor(self.leftpad, dtype=torch.int32)
        return {n: x.to(device) for n, x in t.items()}

    @property
    def kwargs(self):
        kw = {"is_causal": self.causal}
        if self.window is not None:
            kw["window_size"] = self.window
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        return kw


CASES = [
    Cache("decode-ragged-incl0-gqa", (0, 17, 70)),
    Cache("decode-mqa-noncausal", (33, 96), Hq=4, Hkv=1, causal=False),
    Cache("prefill-L5-short-seq-rows-empty", (3, 40), L=5),
    Cache("prefill-L17-mqa-unsplit", (20, 64), L=17, Hq=4, Hkv=1),  # 68 packed rows: one split, sinks in epilogue
    Cache("window-softcap-alibi-L3", (50, 90), L=3, window=(8, 0), softcap=5.0, alibi=True),
    Cache("sinks-decode-incl0", (0, 45, 96), sinks=True),
    Cache("sinks-prefill-L5-empty-rows", (2, 60), L=5, sinks=True),
    Cache("sinks-L17-unsplit", (30, 64), L=17, Hq=4, Hkv=1, sinks=True),
    Cache("leftpad-window", (20, 70, 5), L=2, leftpad=(4, 0, 5), window=(10, 0)),
    Cache("append-L2-leftpad-sinks", (10, 40), L=2, leftpad=(3, 1), append=True, sinks=True),
]
# head dims above 256 (taken in chunks): MLA's 576 with one latent kv head, decoding split over the keys
LARGE_HEAD_DIM_CASE = Cache("mla-E576-decode-mqa-sinks", (17, 70), Hq=4, Hkv=1, E=576, sinks=True)
LAYOUTS = [None, 1, 16, CAPACITY]  # contiguous, then page sizes (the last: one page per sequence)


def layout_id(page_size):
    return "contiguous" if page_size is None else ("page-whole" if page_size == CAPACITY else f"page{page_size}")


def run(case, t, dtype, backend, page_size=None, batch_idx=False):
    """kvcache_attention on fresh copies of the caches (k_new writes into them) -> out, lse."""
    t = {n: (x.to(dtype) if x.is_floating_point() and n not in ("alibi_slopes", "sinks") else x).clone()
         for n, x in t.items()}
    extra = {}
    if page_size is not None:
        t["k_cache"], t["v_cache"], extra["block_table"] = paged_caches(t["k_cache"], t["v_cache"], page_size,
                                                                        torch.Generator().manual_seed(1))
    elif batch_idx:  # sequence b lives in cache row rows[b] of a bigger cache
        B = t["k_cache"].shape[0]
        rows = torch.tensor([B + 1 - b for b in range(B)], dtype=torch.int32, device=t["q"].device)
        for name in ("k_cache", "v_cache"):
            big = torch.randn(B + 2, *t[name].shape[1:], generator=torch.Generator().manual_seed(5)).to(t[name])
            big[rows.long()] = t[name]
            t[name] = big
        extra["cache_batch_idx"] = rows
    q, k_cache, v_cache = t.pop("q"), t.pop("k_cache"), t.pop("v_cache")
    return pyattn.kvcache_attention(q, k_cache, v_cache, **t, **extra, **case.kwargs, return_lse=True,
                                    backend=backend)


def params():
    out = []
    for case, layouts, dtypes in [*((c, LAYOUTS, DTYPES) for c in CASES), (LARGE_HEAD_DIM_CASE, [16], DTYPES[:1])]:
        for page_size in layouts:
            for dtype in dtypes:
                out.append(pytest.param(case, page_size, dtype, id=f"{case.id}-{layout_id(page_size)}-"
                                                                   f"{dtype_id(dtype)}"))
    return out


@pytest.mark.parametrize("case,page_size,dtype", params())
def test_kvcache_matches_oracle(backend, device, case, page_size, dtype):
    t = case.make(device)
    ours = run(case, t, dtype, backend, page_size)
    base = run(case, t, dtype, "reference", page_size)
    oracle = run(case, t, torch.float64, "reference")
    for name, y, b, o in zip(("out", "lse"), ours, base, oracle):
        assert y.dtype == (torch.float32 if name == "lse" else dtype), f"{name}: dtype {y.dtype}"
        assert_close_to_oracle(name, y.cpu(), b.cpu(), o.cpu(), dtype)
    if page_size is not None:  # the very same arithmetic as the contiguous cache
        for y, c in zip(ours, run(case, t, dtype, backend)):
            torch.testing.assert_close(y, c, rtol=0, atol=0)


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[8]], ids=lambda c: c.id)
def test_kvcache_tma_path(backend, device, case, monkeypatch):
    """A contiguous cache's K/V through tensor descriptors (sm_90 on a GPU; forced under the interpreter), with an
    empty sequence, cache rows picked by cache_batch_idx and leftpad: matches the oracle."""
    from pyattn.kernels import configs, launch
    if device == "cpu":
        monkeypatch.setattr(configs, "TMA_IN_INTERPRETER", True)
    t = case.make(device)
    cc = 0 if device == "cpu" else configs.arch(torch.cuda.current_device())
    assert launch._tma_ok(cc, t["k_cache"].half()) == (device == "cpu" or cc >= 90)
    base, oracle = run(case, t, torch.float16, "reference"), run(case, t, torch.float64, "reference")
    for batch_idx in (False, True):
        ours = run(case, t, torch.float16, backend, batch_idx=batch_idx)
        for name, y, b, o in zip(("out", "lse"), ours, base, oracle):
            assert_close_to_oracle(name, y.cpu(), b.cpu(), o.cpu(), torch.float16)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[-1]], ids=lambda c: c.id)
def test_kvcache_cache_batch_idx(backend, device, case):
    """Rows picked by cache_batch_idx from a bigger cache give what a cache of exactly those rows gives."""
    t = case.make(device)
    ours = run(case, t, torch.float32, backend, batch_idx=True)
    direct = run(case, t, torch.float32, backend)
    for y, c in zip(ours, direct):
        torch.testing.assert_close(y, c, rtol=0, atol=0)


def test_kvcache_sink_only_rows(backend, device):
    """A row that sees no key but has a sink: out 0, lse = sink (exactly)."""
    case = Cache("all-empty", (0, 0), L=2, sinks=True)
    t = case.make(device)
    out, lse = run(case, t, torch.float32, backend, page_size=16)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, t["sinks"][None, :, None].expand_as(lse))


def test_kvcache_opcheck(backend, device):
    case = CASES[-1]
    t = case.make(device)
    k, v, block_table = paged_caches(t["k_cache"], t["v_cache"], 16, torch.Generator().manual_seed(1))
    args = KVCacheArgs(q=t["q"], k_cache=k, v_cache=v, seqlens_k=t["cache_seqlens"], block_table=block_table,
                       cache_batch_idx=None, cache_leftpad=t["cache_leftpad"], alibi_slopes=None, sinks=t["sinks"],
                       scale=0.25, window_left=-1, window_right=0, softcap=0.0)
    torch.library.opcheck(torch.ops.pyattn.triton_kvcache_fwd.default, args)


def test_kvcache_explain(backend, device):
    """triton declares the KV-cache features (auto on CUDA picks it; the interpreter can run it)."""
    case = Cache("explain", (5, 9), sinks=True, leftpad=(1, 0))
    t = case.make(device)
    k, v, block_table = paged_caches(t["k_cache"], t["v_cache"], 16, torch.Generator().manual_seed(1))
    text = explain_kvcache(t["q"], k, v, cache_seqlens=t["cache_seqlens"], block_table=block_table,
                           cache_leftpad=t["cache_leftpad"], sinks=t["sinks"])
    line = next(x for x in text.splitlines() if x.strip().startswith("triton"))
    assert "cannot" not in line, line


# sinks in scaled_dot_product_attention: forward and backward (q, k, v and the sinks' own gradient)
SINK_SHAPES = [
    pytest.param(dict(B=1, Hq=2, Hkv=2, L=70, S=70, E=16, kw={"is_causal": True}), id="causal-L70-unsplit"),
    pytest.param(dict(B=2, Hq=4, Hkv=2, L=1, S=100, E=16, kw={"enable_gqa": True}), id="decode-L1-S100-gqa-split"),
    pytest.param(dict(B=1, Hq=2, Hkv=2, L=9, S=33, E=16,
                      kw={"window_size": (2, 0), "causal_alignment": "bottom_right", "softcap": 5.0}),
                 id="window-softcap-br"),
    pytest.param(dict(B=1, Hq=2, Hkv=2, L=40, S=20, E=16,
                      kw={"is_causal": True, "causal_alignment": "bottom_right"}), id="empty-rows-br"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SINK_SHAPES)
def test_sdpa_sinks_fwd_bwd(backend, device, shape, dtype):
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, S, E = (shape[n] for n in ("B", "Hq", "Hkv", "L", "S", "E"))
    tensors = {"q": torch.randn(B, Hq, L, E, generator=g), "k": torch.randn(B, Hkv, S, E, generator=g),
               "v": torch.randn(B, Hkv, S, E, generator=g), "sinks": (torch.randn(Hq, generator=g) * 2).half().float()}
    tensors = {n: x.to(device) for n, x in tensors.items()}

    def call(name):
        return lambda q, k, v, sinks: pyattn.scaled_dot_product_attention(
            q, k, v, sinks=sinks.float() if q.dtype != torch.float64 else sinks, return_lse=True, backend=name,
            **shape["kw"])
    check_fwd_bwd(call(backend), call("reference"), call("reference"), tensors, dtype,
                  grad_names=("q", "k", "v", "sinks"))
