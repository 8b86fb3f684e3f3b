"""Naive attention in plain PyTorch: materializes the L x S scores.

It is the benchmark baseline and, in float64, the tests' oracle. It implements every feature of the
contract with ordinary differentiable tensor ops, so autograd gives its backward.
"""
import torch

from . import block_mask
from .inputs import AttnInputs


def _score_mod(fn, s):
    """torch's score_mod(score, b, h, q_idx, kv_idx) over s (B, Hq, L, S), as torch's math path applies it: on
    broadcast int32 index tensors where fn takes them (one call), else under vmap element by element (fn written for
    scalars). Differentiable in s and in any tensor fn closes over."""
    B, H, L, S = s.shape
    index = [torch.arange(n, device=s.device, dtype=torch.int32).view(*(n if d == i else 1 for d in range(4)))
             for i, n in enumerate((B, H, L, S))]
    try:
        out = fn(s, *index)
        if isinstance(out, torch.Tensor) and out.shape == s.shape:
            return out
    except Exception:  # a score_mod for scalars fails on tensors in its own way: it runs under vmap then
        pass
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv
    with TransformGetItemToIndex():
        return _vmap_for_bhqkv(fn, prefix=(0,))(s, *(i.flatten() for i in index))


def _band(L, S, inp: AttnInputs, device):
    """allowed (L, S) bool by the window/causal band, and |i' - j| for ALiBi."""
    i = torch.arange(L, device=device)[:, None] + (S - L if inp.bottom_right else 0)
    j = torch.arange(S, device=device)[None, :]
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if inp.window_left >= 0:
        allowed &= j >= i - inp.window_left
    if inp.window_right >= 0:
        allowed &= j <= i + inp.window_right
    return allowed, (i - j).abs()


def _dense(q, k, v, mask, alibi, inp: AttnInputs, keep=None):
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask (B, Hq, L, S), alibi (B, Hq); keep (B, Hq, L, S)
    bool: the dropout keep-mask to use (None draws one)."""
    group = q.shape[1] // max(k.shape[1], 1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    L, S = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) * inp.scale
    if inp.softcap:
        s = inp.softcap * torch.tanh(s / inp.softcap)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = s.to(acc_dtype)
    if inp.score_mod is not None:
        s = _score_mod(inp.score_mod, s)
    allowed, distance = _band(L, S, inp, q.device)
    if inp.block_states is not None:
        allowed = allowed & block_mask.dense(inp.block_states, inp.block_bits, inp.block_q, inp.block_k,
                                             q.shape[0], q.shape[1], L, S)
    if alibi is not None:
        s = s - alibi[:, :, None, None].to(acc_dtype) * distance.to(acc_dtype)
    if mask is not None:
        # a bool mask adds -inf where False, as torch applies it: a NaN score stays NaN under it, as in torch
        bias = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask
        s = s + bias.to(acc_dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    if inp.sinks is not None:  # a column per row that joins the softmax and is dropped after it
        sink = inp.sinks.to(acc_dtype)[None, :, None, None].expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], dim=-1)
    # softmax that gives 0 (and finite grads) for rows with no allowed key, as torch does
    row_max = (s.amax(dim=-1, keepdim=True) if S else s.new_full((*s.shape[:-1], 1), float("-inf"))).detach()
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # +inf stays: exp(inf - inf) is NaN, as in torch
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0  # log(0)'s gradient would be NaN: such rows get lse -inf with no gradient
    denom = denom.masked_fill(empty, 1.0)
    p = e / denom
    if inp.sinks is not None:
        p = p[..., :-1]
    lse = (row_max + torch.log(denom)).masked_fill(empty, float("-inf")).squeeze(-1).float()
    if inp.dropout_p > 0:
        p = torch.nn.functional.dropout(p, inp.dropout_p) if keep is None else p * keep / (1 - inp.dropout_p)
    return (p.to(q.dtype) @ v), lse


def attention(inp: AttnInputs, keep=None):
    """-> out (B, Hq, L, Ev), lse (B, Hq, L) float32 natural log. keep: the dropout keep-mask of a dense call."""
    if not inp.varlen:
        return _dense(inp.q, inp.k, inp.v, inp.mask, inp.alibi_slopes, inp, keep)
    if keep is not None:
        raise NotImplementedError("reference attention: a given dropout keep-mask needs dense (not varlen) inputs")
    outs, lses = [], []
    cu_q, cu_k = inp.cu_seqlens_q.tolist(), inp.cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q = inp.q[:, :, cu_q[b]:cu_q[b + 1]]
        k, v = inp.k[:, :, cu_k[b]:cu_k[b + 1]], inp.v[:, :, cu_k[b]:cu_k[b + 1]]
        alibi = None if inp.alibi_slopes is None else inp.alibi_slopes[b:b + 1]
        out, lse = _dense(q, k, v, None, alibi, inp)
        outs.append(out)
        lses.append(lse)
    total_q = inp.q.shape[2]
    out = torch.cat(outs, dim=2) if outs else inp.q.new_zeros(1, inp.q.shape[1], 0, inp.v.shape[-1])
    lse = torch.cat(lses, dim=2) if lses else inp.q.new_zeros(1, inp.q.shape[1], 0, dtype=torch.float32)
    if out.shape[2] < total_q:  # rows past cu_seqlens_q[-1] belong to no sequence
        pad = total_q - out.shape[2]
        out = torch.cat([out, out.new_zeros(*out.shape[:2], pad, out.shape[3])], dim=2)
        lse = torch.cat([lse, lse.new_full((*lse.shape[:2], pad), float("-inf"))], dim=2)
    return out, lse


def kvcache_attention(inp: AttnInputs):
    """A record with a cache part (pyattn.inputs.KVCache) -> out (B, L, Hq, Ev), lse (B, Hq, L): each sequence's keys
    gathered from its cache row or pages (differentiably), then naive attention."""
    outs, lses = [], []
    cache = inp.cache
    page_size = cache.k_cache.shape[1]
    for b, end in enumerate(cache.seqlens_k.tolist()):
        start = int(cache.cache_leftpad[b]) if cache.cache_leftpad is not None else 0
        pos = torch.arange(start, end, device=inp.device)
        if cache.paged:
            pages, rows = cache.block_table[b].to(torch.int64)[pos // page_size], pos % page_size
            k, v = cache.k_cache[pages, rows], cache.v_cache[pages, rows]
        else:
            row = int(cache.cache_batch_idx[b]) if cache.cache_batch_idx is not None else b
            k, v = cache.k_cache[row, pos], cache.v_cache[row, pos]
        alibi = None if inp.alibi_slopes is None else inp.alibi_slopes[b:b + 1]
        # (S_b, Hkv, D) -> (1, Hkv, S_b, D); q (1, Hq, L, D)
        out, lse = _dense(inp.q[b:b + 1], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, alibi, inp)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)

