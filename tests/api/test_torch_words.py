"""Where torch's scaled_dot_product_attention refuses a call, pyattn's refusal of the same call carries torch's own
message (and an exception class torch's raise matches), so code that matches torch's errors keeps working. torch's
message is taken from torch on the same CPU inputs; where torch's eager CPU kernel takes the call or words it after
the matmul, from torch's own validation (meta tensors, as torch.compile's fake tensors see it)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import pyattn
from pyattn.flash_attn import flash_attn_with_kvcache

Q, K, V = (2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8)


def qkv(q=Q, k=K, v=V, dtypes=(torch.float32,) * 3):
    return [torch.randn(s, dtype=d) for s, d in zip((q, k, v), dtypes)]


# id -> (q, k, v, keyword arguments, where torch's words come from: "eager" on the CPU tensors, or "meta")
CASES = {
    "bool-mask-with-is_causal": (*qkv(), dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), "meta"),
    "float-mask-with-is_causal": (*qkv(), dict(attn_mask=torch.zeros(2, 1, 5, 7), is_causal=True), "meta"),
    "causal-upper-left-with-is_causal": (*qkv(), dict(attn_mask=causal_upper_left(5, 7), is_causal=True), "eager"),
    "causal-lower-right-with-is_causal": (*qkv(), dict(attn_mask=causal_lower_right(5, 7), is_causal=True), "eager"),
    "key-of-another-dtype": (*qkv(dtypes=(torch.float32, torch.float64, torch.float32)), {}, "eager"),
    "value-of-another-dtype": (*qkv(dtypes=(torch.float32, torch.float32, torch.float16)), {}, "eager"),
    "key-on-another-device": (qkv()[0], torch.randn(K, device="meta"), qkv()[2], {}, "eager"),
    "query-of-one-dim": (torch.randn(8), *qkv()[1:], {}, "eager"),
    "head-dims-differ": (*qkv(k=(2, 4, 7, 4)), {}, "eager"),
    "head-dims-differ-3d": (*qkv(q=(4, 5, 8), k=(4, 7, 4), v=(4, 7, 8)), {}, "eager"),
    "key-and-value-lengths-differ": (*qkv(v=(2, 4, 6, 8)), {}, "meta"),
    "heads-differ-without-gqa": (*qkv(k=(2, 2, 7, 8), v=(2, 2, 7, 8)), {}, "eager"),
    "batches-differ": (*qkv(k=(3, 4, 7, 8), v=(3, 4, 7, 8)), {}, "eager"),
    "gqa-heads-do-not-divide": (*qkv(k=(2, 3, 7, 8), v=(2, 3, 7, 8)), dict(enable_gqa=True), "eager"),
    # eager words it in the addition to the scores; torch's validation before any compute is the meta message
    "mask-does-not-broadcast": (*qkv(), dict(attn_mask=torch.ones(3, 7, dtype=torch.bool)), "meta"),
    "mask-of-int64": (*qkv(), dict(attn_mask=torch.ones(5, 7, dtype=torch.int64)), "eager"),
    "mask-of-float64": (*qkv(), dict(attn_mask=torch.ones(5, 7, dtype=torch.float64)), "eager"),
    "dropout-above-one": (*qkv(), dict(dropout_p=1.5), "eager"),
    "scale-a-string": (*qkv(), dict(scale="0.5"), "eager"),
    "is_causal-an-int": (*qkv(), dict(is_causal=1), "eager"),
    "key-not-a-tensor": (qkv()[0], 3, qkv()[2], {}, "eager"),
}


def _meta(t):
    return torch.empty_like(t, device="meta") if type(t) is torch.Tensor else t


def torch_refusal(q, k, v, kwargs, source):
    """torch's exception for the call, from the source the case names."""
    if source == "meta":
        q, k, v = map(_meta, (q, k, v))
        kwargs = {name: _meta(x) for name, x in kwargs.items()}
    with pytest.raises((RuntimeError, TypeError, ValueError)) as torch_error:
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    return torch_error.value


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_carries_torchs_words(case):
    q, k, v, kwargs, source = CASES[case]
    expected = torch_refusal(q, k, v, kwargs, source)
    with pytest.raises(type(expected)) as ours:
        pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
    assert str(expected) in str(ours.value)
    assert isinstance(ours.value, pyattn.AttentionInputError)  # and pyattn's own detail follows
    assert "(pyattn: " in str(ours.value)


def test_refusal_torch_does_not_make_keeps_pyattns_words():
    q, k, v = qkv()
    with pytest.raises(pyattn.AttentionInputError) as ours:
        pyattn.scaled_dot_product_attention(q, k, v, window_size=(1, 2, 3))
    assert str(ours.value).startswith("window_size must be a pair of ints")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("entry", ["kvcache_attention", "flash_attn_with_kvcache"])
def test_capacity_error_names_what_limits_it(entry, paged):
    """A sequence longer than the cache: a paged cache's capacity is block_table's pages x page_size (the pool may be
    larger), a contiguous one's the cache's sequence dim."""
    B, page_size, pages_per_seq = 2, 4, 3
    if paged:
        k_cache = torch.randn(16, page_size, 2, 8)  # 16 pages in the pool, 3 per sequence: capacity 12, not 64
        block_table = torch.arange(B * pages_per_seq, dtype=torch.int32).view(B, pages_per_seq)
    else:
        k_cache, block_table = torch.randn(B, 12, 2, 8), None
    q, new = torch.randn(B, 1, 4, 8), torch.randn(B, 1, 2, 8)
    seqlens = torch.tensor([3, 12], dtype=torch.int32)  # sequence 1 is full: one more token does not fit
    with pytest.raises(pyattn.AttentionInputError) as error:
        if entry == "kvcache_attention":
            pyattn.kvcache_attention(q, k_cache, k_cache.clone(), k_new=new, v_new=new, cache_seqlens=seqlens,
                                     block_table=block_table)
        else:
            flash_attn_with_kvcache(q, k_cache, k_cache.clone(), new, new, cache_seqlens=seqlens,
                                    block_table=block_table)
    message = str(error.value)
    assert "cache capacity 12" in message
    if paged:
        assert f"block_table {tuple(block_table.shape)}: 3 pages of page_size 4" in message
    else:
        assert "the sequence dim of k_cache (2, 12, 2, 8)" in message
