"""The input record: user arguments validated (pyattn/validate.py) and normalized (pyattn/normalize.py) once, so
backends never re-parse them. One record for every entry point; each builder below only translates its arguments.

Every call becomes 4-D q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), an optional mask (B, Hq, L, S), and
plain options; a KV-cache call adds its cache part. Causal masking is folded into the window (causal ==
window_right 0), so kernels have one band rule.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import features as F
from . import normalize, torch_words, validate
from .errors import AttentionInputError, AttentionTypeError
from .validate import Shapes


@dataclass
class KVCache:
    """What a kvcache_attention call adds: sequence b attends to cache positions [cache_leftpad[b] (or 0),
    seqlens_k[b]); its queries are bottom-right aligned (query i sits at seqlens_k[b] - L + i)."""
    k_cache: torch.Tensor  # (B_cache, S_max, Hkv, E), or paged (num_pages, page_size, Hkv, E): the user's layout
    v_cache: torch.Tensor  # like k_cache, last dim Ev
    k_new: Optional[torch.Tensor]  # (B, L_new, Hkv, E), written into the cache at cache_seqlens
    v_new: Optional[torch.Tensor]  # (B, L_new, Hkv, Ev)
    cache_seqlens: torch.Tensor  # (B,) int32: tokens in the cache before the append
    seqlens_k: torch.Tensor  # (B,) int32: cache_seqlens + L_new, the end of each sequence's keys
    block_table: Optional[torch.Tensor]  # (B, max_pages) int32
    cache_batch_idx: Optional[torch.Tensor]  # (B,) int32: cache row of each sequence (contiguous caches)
    cache_leftpad: Optional[torch.Tensor]  # (B,) int32: first cache position of each sequence
    needs_grad: bool  # autograd must see the call (only the reference backend differentiates it)

    @property
    def paged(self):
        return self.block_table is not None

    @property
    def capacity(self):
        """Cache positions a sequence can hold."""
        if self.paged:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[1]


@dataclass
class AttnInputs:
    q: torch.Tensor  # (B, Hq, L, E); with a cache, the user's (B, L, Hq, E) seen so
    k: torch.Tensor  # (B, Hkv, S, E); with a cache, k_cache seen as (rows or pages, Hkv, S_max or page_size, E)
    v: torch.Tensor  # (B, Hkv, S, Ev); likewise
    mask: Optional[torch.Tensor]  # (B, Hq, L, S) bool (True = attend) or float (added), or None
    alibi_slopes: Optional[torch.Tensor]  # (B, Hq) float32, or None
    cu_seqlens_q: Optional[torch.Tensor]  # (B + 1,) int32 in varlen mode, where q/k/v hold B == 1 packed rows
    cu_seqlens_k: Optional[torch.Tensor]
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded; 0 = causal
    bottom_right: bool
    softcap: float  # 0 = off
    dropout_p: float
    return_lse: bool
    out_shape: tuple  # the user-facing output shape; lse is out_shape[:-1] (a cache call's lse: (B, Hq, L))
    sinks: Optional[torch.Tensor] = None  # (Hq,) float32 sink logits, or None
    cache: Optional[KVCache] = None  # kvcache_attention's cache part
    # a block-sparse mask (csrc/ops.cpp: the fwd op's arguments of these names), ANDed with the other masks
    block_states: Optional[torch.Tensor] = None  # (1 or B, 1 or Hq, ceil(L / block_q), ceil(S / block_k)) int32
    block_bits: Optional[torch.Tensor] = None  # (P, block_q, ceil(block_k / 8)) uint8: partial blocks' bits
    block_q: int = 0
    block_k: int = 0

    @property
    def device(self):
        return self.q.device

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    @property
    def head_dims(self):
        return self.q.shape[-1], self.v.shape[-1]

    @property
    def is_causal(self):
        return self.window_right == 0 and self.window_left < 0

    def describe(self):
        """The tensors as the user passed them, for explain()."""
        if self.cache is None:
            return f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)}"
        return (f"q {tuple(self.q.transpose(1, 2).shape)} k_cache {tuple(self.cache.k_cache.shape)} "
                f"v_cache {tuple(self.cache.v_cache.shape)}")

    def uses(self):
        """The features this call needs (pyattn.features): what backends check against."""
        cache = self.cache
        wanted = [
            (self.mask is not None and self.mask.dtype == torch.bool, F.BOOL_MASK),
            (self.mask is not None and self.mask.dtype != torch.bool, F.FLOAT_MASK),
            (cache is not None, F.KVCACHE),
            (cache is not None and cache.paged, F.PAGED_KV_CACHE),
            (cache is not None and cache.cache_batch_idx is not None, F.CACHE_BATCH_IDX),
            (cache is not None and cache.cache_leftpad is not None, F.CACHE_LEFTPAD),
            (self.window_left >= 0 or self.window_right > 0, F.SLIDING_WINDOW),
            (self.window_right == 0, F.CAUSAL),
            (self.bottom_right, F.BOTTOM_RIGHT),
            (bool(self.softcap), F.SOFTCAP),
            (self.alibi_slopes is not None, F.ALIBI),
            (self.dropout_p > 0, F.DROPOUT),
            (self.varlen, F.VARLEN),
            (self.return_lse, F.RETURN_LSE),
            (self.q.shape[1] != self.k.shape[1], F.GQA),
            (self.sinks is not None, F.SINKS),
            (cache is not None and cache.needs_grad, F.KVCACHE_GRADIENT),
        ]
        return [feature for used, feature in wanted if used]


def dense_inputs(query, key, value, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 **extras):
    """scaled_dot_product_attention's arguments -> AttnInputs (dense_outputs maps the results back). Where torch's
    function refuses the same arguments, the error starts with torch's words (pyattn/torch_words.py)."""
    query, key, value, attn_mask = normalize.autocast(query, key, value, attn_mask)
    try:
        return _dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **extras)
    except AttentionInputError as e:
        words = torch_words.sdpa_refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        raise torch_words.with_torch_words(e, words) from None


def _dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size=None, softcap=None,
           alibi_slopes=None, causal_alignment="top_left", return_lse=False, sinks=None):
    for name, t in (("query", query), ("key", key), ("value", value)):
        validate.tensor(name, t, ndim_min=2)
    validate.qkv_types(query=query, key=key, value=value)
    (L, E), (S, Ek), (Sv, Ev) = query.shape[-2:], key.shape[-2:], value.shape[-2:]
    shapes = Shapes(query=query, key=key, value=value)
    if Ek != E:
        raise AttentionInputError(f"query and key must have the same head dim E (last dim), got {shapes}")
    if Sv != S:
        raise AttentionInputError(f"key and value must have the same sequence length S (dim -2), got {shapes}")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise AttentionTypeError(f"is_causal and enable_gqa must be bools, got {type(is_causal).__name__} and "
                                 f"{type(enable_gqa).__name__}")
    validate.mask_and_causal(attn_mask, is_causal, shapes)
    if validate.is_causal_bias(attn_mask):  # the kernels' causal band in the bias's alignment: no L x S tensor
        causal_alignment = validate.causal_bias(attn_mask, L, S, causal_alignment, shapes)
        attn_mask, is_causal = None, True
    key, value, q_batch, kv_batch = normalize.batch_shapes(query, key, value, enable_gqa, shapes)
    dropout_p, softcap, bottom_right = validate.options(dropout_p, softcap, causal_alignment, return_lse)
    left, right = validate.window(window_size, is_causal)
    return AttnInputs(
        q=normalize.as_bhld(query, q_batch), k=normalize.as_bhld(key, kv_batch), v=normalize.as_bhld(value, kv_batch),
        mask=validate.mask(attn_mask, q_batch, L, S, query),
        alibi_slopes=validate.alibi(alibi_slopes, q_batch if q_batch else (1,), query.device),
        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=L, max_seqlen_k=S,
        scale=validate.scale(scale, E), window_left=left, window_right=right, bottom_right=bottom_right,
        softcap=softcap, dropout_p=dropout_p, return_lse=return_lse, out_shape=(*q_batch, L, Ev),
        sinks=validate.sinks(sinks, q_batch[-1] if q_batch else 1, query))


def dense_outputs(inp: AttnInputs, out, lse):
    """out (B, Hq, L, Ev), lse (B, Hq, L) -> out in the user's shape, or (out, lse) with return_lse. A 4-D out is
    returned as it is: reshape to the same shape may restride its size-1 dims, and its strides follow q's as torch's."""
    if tuple(out.shape) != tuple(inp.out_shape):
        out = out.reshape(inp.out_shape)
    return (out, lse.reshape(inp.out_shape[:-1])) if inp.return_lse else out


def varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False, scale=None,
                  window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left", dropout_p=0.0,
                  return_lse=False, sinks=None):
    """varlen_attention's arguments -> AttnInputs of B == 1 packed rows."""
    validate.tensors_of_rank(3, "(total, heads, head_dim)", q=q, k=k, v=v)
    validate.qkv_types(q=q, k=k, v=v)
    shapes = Shapes(q=q, k=k, v=v)
    if k.shape[2] != q.shape[2]:
        raise AttentionInputError(f"q and k must have the same head dim, got {shapes}")
    if k.shape[:2] != v.shape[:2]:
        raise AttentionInputError(f"k and v must have the same total length and heads, got {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise AttentionInputError(f"q heads must be a multiple of k/v heads, got {shapes}")
    validate.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    validate.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise AttentionInputError(f"cu_seqlens_q and cu_seqlens_k must have the same size (batch + 1), got "
                                  f"{validate.shape(cu_seqlens_q)} and {validate.shape(cu_seqlens_k)}")
    dropout_p, softcap, bottom_right = validate.options(dropout_p, softcap, causal_alignment, return_lse)
    left, right = validate.window(window_size, validate.flag("is_causal", is_causal))
    batch, hq = cu_seqlens_q.numel() - 1, q.shape[1]
    return AttnInputs(
        q=q.transpose(0, 1).unsqueeze(0), k=k.transpose(0, 1).unsqueeze(0), v=v.transpose(0, 1).unsqueeze(0),
        mask=None, alibi_slopes=validate.alibi(alibi_slopes, (batch, hq), q.device),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, scale=validate.scale(scale, q.shape[2]), window_left=left, window_right=right,
        bottom_right=bottom_right, softcap=softcap, dropout_p=dropout_p, return_lse=return_lse,
        out_shape=(q.shape[0], hq, v.shape[2]), sinks=validate.sinks(sinks, hq, q))


def kvcache_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                   is_causal, window_size, softcap, alibi_slopes, sinks, scale, return_lse):
    """kvcache_attention's arguments -> AttnInputs with a cache part; every index is checked against the cache here,
    values included, before anything is written. Caches stay in the user's layout."""
    validate.tensors_of_rank(4, "(q: (B, L, Hq, D); caches: (B_cache, S_max, Hkv, D), or (num_pages, page_size, Hkv, "
                             "D) with block_table)", q=q, k_cache=k_cache, v_cache=v_cache)
    validate.qkv_types(q=q, k_cache=k_cache, v_cache=v_cache)
    B, L, Hq, E = q.shape
    shapes = Shapes(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape[3] != E:
        raise AttentionInputError(f"q and k_cache must have the same head dim, got {shapes}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise AttentionInputError(f"k_cache and v_cache must agree in all but the last dim, got {shapes}")
    if k_cache.shape[2] == 0 or Hq % k_cache.shape[2]:
        raise AttentionInputError(f"q heads must be a multiple of the cache's kv heads, got {shapes}")
    validate.flag("is_causal", is_causal)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = validate.int32_vector("cache_seqlens", cache_seqlens, B, q.device)
    if cache_leftpad is not None:
        cache_leftpad = validate.int32_vector("cache_leftpad", cache_leftpad, B, q.device)
    block_table, cache_batch_idx = validate.cache_rows(block_table, cache_batch_idx, q, k_cache, shapes)
    L_new = validate.new_keys(k_new, v_new, q, k_cache, v_cache)
    _, softcap, _ = validate.options(0.0, softcap, "bottom_right", return_lse)
    left, right = validate.window(window_size, is_causal)
    sinks = validate.sinks(sinks, Hq, q)
    alibi = validate.alibi(alibi_slopes, (B, Hq), q.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, sinks, alibi))
    cache = KVCache(k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
                    seqlens_k=cache_seqlens + L_new if L_new else cache_seqlens, block_table=block_table,
                    cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, needs_grad=needs_grad)
    if not torch.compiler.is_compiling():
        validate.cache_indices(cache, L_new)
    return AttnInputs(
        q=q.transpose(1, 2), k=k_cache.transpose(1, 2), v=v_cache.transpose(1, 2), mask=None,
        alibi_slopes=alibi.contiguous() if alibi is not None else None, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=L, max_seqlen_k=cache.capacity, scale=validate.scale(scale, E), window_left=left,
        window_right=right, bottom_right=True, softcap=softcap, dropout_p=0.0, return_lse=return_lse,
        out_shape=(B, L, Hq, v_cache.shape[3]), sinks=sinks, cache=cache)
