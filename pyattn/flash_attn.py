"""FlashAttention 2.x's interface (flash_attn.flash_attn_interface) on every pyattn backend.

    from pyattn.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same names, positional order, defaults, (batch, seqlen, nheads, headdim) layouts and return values as flash-attn
2.x. Tensors go to pyattn's public functions as transposed views (the kernels take strides: nothing is copied for
the layout). What cannot be matched (README "Coming from FlashAttention"):
- S_dmask (return_attn_probs): an empty tensor, as flash-attn returns without dropout; with dropout flash-attn
  returns its kernel's probabilities with the dropout pattern in their sign, which pyattn never forms.
- dropout draws from torch's default generator (torch.manual_seed reproduces it), not flash-attn's Philox stream.
- deterministic is accepted and changes nothing: pyattn's backward is deterministic always. num_splits is ignored.
- float32 and float64 run too, any head dim a backend takes, cache_leftpad with a paged cache.
"""
import torch

from .errors import AttentionInputError, AttentionTypeError
from .functional import scaled_dot_product_attention, varlen_attention
from .kvcache import kvcache_attention

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _options(causal, window_size, softcap, seqlen_k):
    """flash-attn's options -> pyattn's keywords: a window side that is negative or >= seqlen_k (the longest key
    sequence, or the cache) is unbounded (-1), as flash-attn clamps it; causal is window right = 0 (pyattn folds
    it); softcap <= 0 is off (None)."""
    if isinstance(causal, torch.Tensor) or not hasattr(type(causal), "__bool__"):
        raise AttentionTypeError(f"causal must be a bool, got {type(causal).__name__}")
    causal = bool(causal)  # flash-attn's C++ binding takes any truthy scalar (numpy.bool_, 0/1)
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise AttentionInputError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    window = tuple(-1 if w < 0 or w >= seqlen_k else w for w in (left, right))
    return dict(is_causal=causal, window_size=None if window == (-1, -1) else window,
                softcap=softcap if softcap > 0 else None)


def _flash_lse(lse):
    """flash-attn gives rows with no key lse = +inf (pyattn: -inf, the log of an empty sum)."""
    return torch.where(lse == float("-inf"), float("inf"), lse)


def _s_dmask(q):
    return torch.empty((0,), dtype=q.dtype, device=q.device)


def _check(q, k, v, layout):
    """q, k, v in layout "(batch_size, seqlen, nheads, headdim)" or "(total, nheads, headdim)": flash-attn's checks."""
    ndim = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise AttentionInputError(f"{name} must be a {ndim}-D tensor {layout}, got {_shape(t)}")
    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
    if ndim == 4 and not q.shape[0] == k.shape[0] == v.shape[0]:
        raise AttentionInputError(f"q, k and v must have the same batch_size, got {shapes}")
    if k.shape[:-1] != v.shape[:-1]:
        raise AttentionInputError(f"k and v must have the same seqlen and nheads_k, got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise AttentionInputError(f"q and k must have the same headdim, got {shapes}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise AttentionInputError(f"Number of heads in key/value must divide number of heads in query, got {shapes}")


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, Dv) [, lse (B, H, Sq), S_dmask]."""
    _check(q, k, v, "(batch_size, seqlen, nheads, headdim)")
    # (B, S, H, D) -> (B, H, S, D) views: the kernels read them through their strides
    out, lse = scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, scale=softmax_scale,
        enable_gqa=True, alibi_slopes=alibi_slopes, causal_alignment="bottom_right", return_lse=True,
        **_options(causal, window_size, softcap, k.shape[1]))
    out = out.transpose(1, 2).contiguous()  # flash-attn's out is contiguous (B, S, H, D): .view works on it
    return (out, _flash_lse(lse), _s_dmask(q)) if return_attn_probs else out


def _varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, alibi_slopes,
                  block_table, **options):
    """flash_attn_varlen_func with block_table: k/v are pages (num_blocks, page_block_size, nheads_k, headdim) and
    sequence b's cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys sit in pages block_table[b]. One kvcache_attention call
    per sequence, on views of q and the pages (nothing copied but the output)."""
    if dropout_p > 0:
        raise AttentionInputError(f"dropout_p = {dropout_p} with block_table (a paged KV cache) is not supported")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 \
            or block_table.shape[0] != cu_seqlens_q.numel() - 1:
        raise AttentionInputError(f"block_table must be (batch_size, max_num_blocks_per_seq) int32 with batch_size = "
                                  f"{cu_seqlens_q.numel() - 1}, got {_shape(block_table)}")
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(len(cu_q) - 1, -1)
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        out, lse = kvcache_attention(
            q[cu_q[b]:cu_q[b + 1]][None], k_cache, v_cache, cache_seqlens=cu_k[b + 1] - cu_k[b],
            block_table=block_table[b:b + 1], scale=softmax_scale, return_lse=True,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes[b:b + 1], **options)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v_cache.shape[-1])
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    if out.shape[0] < q.shape[0]:  # rows past cu_seqlens_q[-1] belong to no sequence
        pad = q.shape[0] - out.shape[0]
        out = torch.cat([out, out.new_zeros(pad, *out.shape[1:])])
        lse = torch.cat([lse, lse.new_full((lse.shape[0], pad), float("-inf"))], dim=1)
    return out, lse


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, return_attn_probs, block_table=None):
    """q (total_q, H, D), k/v (total_k, Hk, D) -> out (total_q, H, Dv) [, lse (H, total_q), S_dmask]."""
    options = _options(causal, window_size, softcap, max_seqlen_k)
    if block_table is not None:
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise AttentionInputError(f"with block_table, q must be (total_q, nheads, headdim) and k, v "
                                      f"(num_blocks, page_block_size, nheads_k, headdim), got q {_shape(q)}, "
                                      f"k {_shape(k)}, v {_shape(v)}")
        out, lse = _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, alibi_slopes,
                                 block_table, **options)
    else:
        _check(q, k, v, "(total, nheads, headdim)")
        out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    scale=softmax_scale, alibi_slopes=alibi_slopes, causal_alignment="bottom_right",
                                    dropout_p=dropout_p, return_lse=True, **options)
    out = out.contiguous()  # (total, H, D), contiguous as flash-attn's
    return (out, _flash_lse(lse), _s_dmask(q)) if return_attn_probs else out


def _unpack(packed, n, dim, name, layout):
    if not isinstance(packed, torch.Tensor) or packed.dim() <= dim or packed.shape[dim] != n:
        raise AttentionInputError(f"{name} must be {layout}, got {_shape(packed)}")
    return packed.unbind(dim)  # views: gradients flow back into the packed tensor


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch_size, seqlen, 3, nheads, headdim) -> out (batch_size, seqlen, nheads, headdim); with
    return_attn_probs also softmax_lse (batch_size, nheads, seqlen) float32 and S_dmask (an empty tensor).
    See flash_attn_func for the options."""
    q, k, v = _unpack(qkv, 3, 2, "qkv", "(batch_size, seqlen, 3, nheads, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch_size, seqlen_q, nheads, headdim), kv (batch_size, seqlen_k, 2, nheads_k, headdim) ->
    out (batch_size, seqlen_q, nheads, headdim). See flash_attn_func for the options."""
    k, v = _unpack(kv, 2, 2, "kv", "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch_size, seqlen_q, nheads, headdim), k/v (batch_size, seqlen_k, nheads_k, headdim) ->
    out (batch_size, seqlen_q, nheads, headdim); with return_attn_probs, (out, softmax_lse (batch_size, nheads,
    seqlen_q) float32, S_dmask) where S_dmask is an empty tensor (module docstring).

    nheads a multiple of nheads_k (GQA/MQA). causal is bottom-right aligned: query i sits at key position
    i + seqlen_k - seqlen_q and sees keys up to it; window_size (left, right) bounds the keys to
    [i' - left, i' + right] (-1 = unbounded). softcap > 0 caps the scores at c * tanh(s / c). alibi_slopes
    (nheads,) or (batch_size, nheads) float32 add -slope * |i' - j|. Rows with no key give 0 (lse +inf).
    dropout_p > 0 drops with torch's default generator. deterministic: accepted (the backward always is).
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, nheads, headdim), cu_seqlens (batch_size + 1,) int32 -> out (total, nheads, headdim); with
    return_attn_probs also softmax_lse (nheads, total) and S_dmask (empty). See flash_attn_varlen_func."""
    q, k, v = _unpack(qkv, 3, 1, "qkv", "(total, 3, nheads, headdim)")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, nheads, headdim), kv (total_k, 2, nheads_k, headdim) -> out (total_q, nheads, headdim).
    See flash_attn_varlen_func."""
    k, v = _unpack(kv, 2, 1, "kv", "(total_k, 2, nheads_k, headdim)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), cu_seqlens_q/k
    (batch_size + 1,) int32 -> out (total_q, nheads, headdim); with return_attn_probs also softmax_lse
    (nheads, total_q) float32 and S_dmask (empty). Each sequence attends within itself, bottom-right aligned as in
    flash_attn_func. With block_table (batch_size, max_num_blocks_per_seq) int32, k/v are a paged cache
    (num_blocks, page_block_size, nheads_k, headdim) holding sequence b's keys in pages block_table[b]
    (any page size; no dropout).
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs, block_table)


def _rotate(x, cos, sin, interleaved):
    """Rotary embedding of x (B, L, H, D) by cos/sin (B, L, rotary_dim / 2), on its first rotary_dim features:
    pairs (0, 1), (2, 3), ... when interleaved, else (i, i + rotary_dim / 2) (GPT-NeoX). Computed in float32
    (float64 for float64), returned in x's dtype."""
    rd = cos.shape[-1] * 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos[:, :, None].to(acc), sin[:, :, None].to(acc)
    r = x[..., :rd].to(acc)
    if interleaved:
        x1, x2 = r[..., 0::2], r[..., 1::2]
        r = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = r[..., :rd // 2], r[..., rd // 2:]
        r = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([r.to(x.dtype), x[..., rd:]], dim=-1)


def _rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, interleaved, contiguous_q):
    """Rotates q and the new keys k (never the cache) at flash-attn's positions: k's token i at cache position
    cache_seqlens[b] + i; q's query i there too when causal or local, else every query at cache_seqlens[b].
    flash-attn indexes cos/sin by cache position, cache_leftpad included (its kernel and tests)."""
    for name, t in (("q", q), ("k", k)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 4):
            raise AttentionInputError(f"{name} must be 4-D (batch_size, seqlen, nheads, headdim), got {_shape(t)}")
    if k is None:
        raise AttentionInputError("If rotary cos/sin are provided, new key / value to be appended to KV cache must "
                                  "also be provided (k, v)")
    if rotary_sin is None or rotary_cos is None:
        raise AttentionInputError("rotary_cos and rotary_sin must be given together")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape != rotary_cos.shape:
            raise AttentionInputError(f"{name} must be (seqlen_ro, rotary_dim / 2) like rotary_cos, got {_shape(t)} "
                                      f"(rotary_cos {_shape(rotary_cos)})")
        if t.dtype != q.dtype or t.device != q.device:
            raise AttentionTypeError(f"{name} must have the same dtype and device as q ({q.dtype} on {q.device}), "
                                     f"got {t.dtype} on {t.device}")
    seqlen_ro, rd = rotary_cos.shape[0], rotary_cos.shape[1] * 2
    if rd == 0 or rd > q.shape[-1]:
        raise AttentionInputError(f"rotary_dim = 2 * rotary_cos.shape[1] = {rd} must be in [2, headdim = "
                                  f"{q.shape[-1]}]")
    B, L = q.shape[:2]
    if isinstance(cache_seqlens, torch.Tensor) and (cache_seqlens.shape != (B,) or cache_seqlens.dtype != torch.int32):
        raise AttentionInputError(f"cache_seqlens must be an int or an int32 tensor of shape (batch_size,) = ({B},), "
                                  f"got {cache_seqlens.dtype} {_shape(cache_seqlens)}")
    start = torch.as_tensor(cache_seqlens, device=q.device).to(torch.int64).expand(B)[:, None]  # (B, 1)
    pos_k = start + torch.arange(k.shape[1], device=q.device)  # (B, L_new)
    pos_q = start + torch.arange(L, device=q.device) if contiguous_q else start.expand(B, L)
    last = max(int(pos_k.max()) if pos_k.numel() else -1, int(pos_q.max()) if pos_q.numel() else -1)
    if last >= seqlen_ro:
        raise AttentionInputError(f"rotary_cos/rotary_sin {_shape(rotary_cos)} hold {seqlen_ro} positions, but "
                                  f"position {last} is needed (cache_seqlens + new tokens)")
    q = _rotate(q, rotary_cos[pos_q], rotary_sin[pos_q], interleaved)
    k = _rotate(k, rotary_cos[pos_k], rotary_sin[pos_k], interleaved)
    return q, k


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decoding over a KV cache (pyattn.kvcache_attention), flash-attn's arguments and results.

    q (batch_size, seqlen, nheads, headdim); k_cache/v_cache (batch_size_cache, seqlen_cache, nheads_k, headdim),
    or paged (num_blocks, page_block_size, nheads_k, headdim) with block_table (batch_size, max_num_blocks_per_seq)
    int32 (any page size). k/v (batch_size, seqlen_new, nheads_k, headdim) are written into the caches in place at
    positions cache_seqlens[b] ... before attending. cache_seqlens: int or (batch_size,) int32, tokens in the cache;
    None (only without k/v) means the whole cache. cache_batch_idx (batch_size,) int32 picks cache rows;
    cache_leftpad (batch_size,) int32: where each sequence starts in its cache. Queries are bottom-right aligned.
    rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2), in q's dtype: q and k are rotated (interleaved pairs, or
    halves when rotary_interleaved=False) at cache positions cache_seqlens[b] + i before the append; q is rotated
    at cache_seqlens[b] alone unless causal or local. num_splits is ignored. -> out (batch_size, seqlen, nheads,
    headdim), and softmax_lse (batch_size, nheads, seqlen) float32 with return_softmax_lse. No backward pass
    through k/v (as flash-attn).
    """
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise AttentionInputError(f"k_cache must be 4-D (batch_size_cache, seqlen_cache, nheads_k, headdim), got "
                                  f"{_shape(k_cache)}")
    paged = isinstance(block_table, torch.Tensor) and block_table.dim() == 2
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    options = _options(causal, window_size, softcap, capacity)
    if cache_seqlens is None:
        if k is not None:
            raise AttentionInputError("If key is supplied, cache_seqlens must also be passed in")
        cache_seqlens = capacity
    if rotary_cos is not None or rotary_sin is not None:
        local = options["window_size"] is not None  # a window side set below the cache's length
        q, k = _rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, rotary_interleaved, options["is_causal"] or local)
    out, lse = kvcache_attention(q, k_cache, v_cache, k_new=k, v_new=v, cache_seqlens=cache_seqlens,
                                 block_table=block_table, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                                 alibi_slopes=alibi_slopes, scale=softmax_scale, return_lse=True, **options)
    return (out, _flash_lse(lse)) if return_softmax_lse else out
