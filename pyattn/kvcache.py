"""kvcache_attention: decoding and chunked prefill over a KV cache, contiguous or paged, for serving loops."""
import torch

from . import backends
from .inputs import KVCache, kvcache_inputs
from .normalize import autocast


def append(cache: KVCache):
    """Writes k_new/v_new (B, L_new, Hkv, D) into the caches in place at positions cache_seqlens[b] + i."""
    B, L_new = cache.k_new.shape[:2]
    device = cache.k_cache.device
    pos = cache.cache_seqlens.to(torch.int64)[:, None] + torch.arange(L_new, device=device)  # (B, L_new)
    if cache.paged:
        page_size = cache.k_cache.shape[1]
        index = (cache.block_table.gather(1, pos // page_size).to(torch.int64), pos % page_size)
    else:
        rows = cache.cache_batch_idx if cache.cache_batch_idx is not None else torch.arange(B, device=device)
        index = (rows.to(torch.int64)[:, None].expand(B, L_new), pos)
    with torch.no_grad():
        cache.k_cache.index_put_(index, cache.k_new)
        cache.v_cache.index_put_(index, cache.v_new)


def kvcache_attention(q, k_cache, v_cache, *, k_new=None, v_new=None, cache_seqlens, block_table=None,
                      cache_batch_idx=None, cache_leftpad=None, is_causal=True, window_size=None, softcap=None,
                      alibi_slopes=None, sinks=None, scale=None, return_lse=False, backend=None):
    """Attention of q (B, L, Hq, D) over a KV cache, after appending k_new/v_new to it in place.

    Caches: (B_cache, S_max, Hkv, D) (row cache_batch_idx[b], else b, holds sequence b), or paged
    (num_pages, page_size, Hkv, D) with block_table (B, max_pages) int32 (page p of sequence b is
    block_table[b, p]; any page size >= 1). cache_seqlens (B,) int32 (or an int): tokens already cached.
    k_new/v_new (B, L_new, Hkv, D) are written at positions cache_seqlens[b] ... before attending; the caller
    advances cache_seqlens. Sequence b attends to its first S_b = cache_seqlens[b] + L_new positions (from
    cache_leftpad[b] when given); query i sits at position S_b - L + i and, with is_causal, sees keys up to it.
    window_size (left, right) counts positions. sinks (Hq,): per-head sink logits (gpt-oss).
    -> out (B, L, Hq, D) (and lse (B, Hq, L) float32 with return_lse). Every index is checked before anything
    is written, read back in one transfer (one sync on a GPU; none while a CUDA graph is captured, where the
    checks are skipped). Under torch.autocast the attention runs in the caches' dtype. The fused kernels are
    forward-only; when autograd must follow q, the caches or sinks, the reference backend runs (auto) and gradients
    reach them (not k_new/v_new, which must come detached).
    """
    if isinstance(k_cache, torch.Tensor):
        # the caches are written in place and may be GiBs: under autocast they keep their dtype (never a cast copy,
        # which would take the append and cost a copy per step); q and the new keys/values are cast to it
        q, k_new, v_new = autocast(q, k_new, v_new, dtype=k_cache.dtype)
    inp = kvcache_inputs(q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
                         block_table=block_table, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                         is_causal=is_causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                         sinks=sinks, scale=scale, return_lse=return_lse)
    chosen = backends.choose(inp, backend)  # a refusal raises before the cache is touched
    if inp.cache.k_new is not None:
        append(inp.cache)
    out, lse = chosen.kvcache_forward(inp)
    return (out, lse) if return_lse else out


def explain_kvcache(q, k_cache, v_cache, **kwargs):
    """Which backend kvcache_attention(q, k_cache, v_cache, **kwargs) would run on, and why each other one would
    not. Writes nothing."""
    args = {**kvcache_attention.__kwdefaults__, **kwargs}
    unknown = set(args) - set(kvcache_attention.__kwdefaults__) - {"cache_seqlens"}
    if unknown:
        raise TypeError(f"kvcache_attention() got unexpected keyword arguments {sorted(unknown)}")
    backend = args.pop("backend")
    return backends.explain_inputs(kvcache_inputs(q, k_cache, v_cache, **args), backend)
