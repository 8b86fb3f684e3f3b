"""On a GPU: the cuda backend's kvcache_fwd (contiguous and paged caches, cache_batch_idx, cache_leftpad) and its
sinks (kvcache and the dense forward, sm_80 and sm_90a paths) against float64 reference math. Skipped elsewhere."""
import pytest
import torch

import pyattn
from helpers import assert_close_to_oracle, paged_caches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(autouse=True)
def _cuda_build():
    if "cuda" not in pyattn.available_backends():
        pytest.fail("a CUDA machine must build the cuda backend (make gpu-check builds it)", pytrace=False)


def check(q, k_cache, v_cache, dtype, **kw):
    out, lse = pyattn.kvcache_attention(q, k_cache, v_cache, backend="cuda", return_lse=True, **kw)
    oracle, oracle_lse = pyattn.kvcache_attention(q.double(), k_cache.double(), v_cache.double(), backend="reference",
                                                  return_lse=True, **kw)
    base, base_lse = pyattn.kvcache_attention(q, k_cache, v_cache, backend="reference", return_lse=True, **kw)
    assert_close_to_oracle("out", out, base, oracle, dtype)
    assert_close_to_oracle("lse", lse, base_lse, oracle_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("L", [1, 130])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "leftpad", "page1", "page3", "page16", "page64"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": False}, {"window_size": (50, 0), "softcap": 20.0},
                                {"sinks": True}, {"alibi": True}], ids=str)
def test_kvcache_matches_reference(dtype, D, L, layout, kw):
    gen = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv = 3, 384, 4, 2
    rand = lambda *shape: torch.randn(*shape, generator=gen).to("cuda", dtype)  # noqa: E731
    q, k_cache, v_cache = rand(B, L, Hq, D), rand(B + 1, S, Hkv, D), rand(B + 1, S, Hkv, D)
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(Hq, generator=gen).cuda() * 3
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(B, Hq, generator=gen).cuda()
    seqlens = torch.tensor([L + 5, 200, S], dtype=torch.int32, device="cuda")
    if layout == "batch_idx":
        kw["cache_batch_idx"] = torch.tensor([2, 0, 3], dtype=torch.int32, device="cuda")
    elif layout == "leftpad":
        kw["cache_leftpad"] = torch.tensor([3, 100, 0], dtype=torch.int32, device="cuda")
    if layout != "batch_idx":
        k_cache, v_cache = k_cache[:B], v_cache[:B]
    if layout.startswith("page"):  # S = 384 is a multiple of every page size here
        k_cache, v_cache, kw["block_table"] = paged_caches(k_cache, v_cache, int(layout[4:]), gen)
    check(q, k_cache, v_cache, dtype, cache_seqlens=seqlens, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sm90", ["1", "0"], ids=["sm90_if_present", "sm80"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window_size": (16, 0)}], ids=str)
@pytest.mark.parametrize("L,S,E", [(300, 257, 128), (1, 77, 64), (64, 200, 256)], ids=str)
def test_sinks_forward_matches_reference(monkeypatch, dtype, sm90, kw, L, S, E):
    monkeypatch.setenv("PYATTN_CUDA_SM90", sm90)
    q, k, v = (torch.randn(2, 4, n, E, device="cuda", dtype=dtype) for n in (L, S, S))
    sinks = torch.randn(4, device="cuda") * 3
    args = dict(sinks=sinks, return_lse=True, **kw)
    out, lse = pyattn.scaled_dot_product_attention(q, k, v, backend="cuda", **args)
    oracle, oracle_lse = pyattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), backend="reference",
                                                              **args)
    base, base_lse = pyattn.scaled_dot_product_attention(q, k, v, backend="reference", **args)
    assert_close_to_oracle("out", out, base, oracle, dtype)
    assert_close_to_oracle("lse", lse, base_lse, oracle_lse, dtype)


def test_fully_masked_row_with_a_sink_gives_zero_and_the_sink():
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16) for n in (4, 3, 3))
    sinks = torch.tensor([0.5, -1.0], device="cuda")
    mask = torch.zeros(4, 3, dtype=torch.bool, device="cuda")
    mask[1:] = True  # row 0 sees no key
    out, lse = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, sinks=sinks, backend="cuda",
                                                   return_lse=True)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))
    torch.testing.assert_close(lse[0, :, 0], sinks)
