"""kvcache_attention's input record: its arguments validated once, values included, before anything is written.

Sequence b attends to cache positions [cache_leftpad[b] (or 0), seqlens_k[b]) with seqlens_k = cache_seqlens
(+ L_new when k_new is appended); its L queries are bottom-right aligned (query i sits at seqlens_k[b] - L + i,
counted from cache_leftpad[b]). Caches stay in the user's layout: (B_cache, S_max, Hkv, D) contiguous, or
(num_pages, page_size, Hkv, D) paged through block_table (B, max_pages) int32.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import features as F
from .errors import AttentionInputError, AttentionTypeError
from .inputs import _alibi, _check_qkv_types, _check_tensor, _options, _scale, _shape, _Shapes, _sinks, _window


@dataclass
class KVCacheInputs:
    q: torch.Tensor  # (B, L, Hq, E)
    k_cache: torch.Tensor  # (B_cache, S_max, Hkv, E) or paged (num_pages, page_size, Hkv, E)
    v_cache: torch.Tensor  # like k_cache, last dim Ev
    k_new: Optional[torch.Tensor]  # (B, L_new, Hkv, E), written into the cache at cache_seqlens
    v_new: Optional[torch.Tensor]  # (B, L_new, Hkv, Ev)
    cache_seqlens: torch.Tensor  # (B,) int32: tokens in the cache before the append
    seqlens_k: torch.Tensor  # (B,) int32: cache_seqlens + L_new, the end of each sequence's keys
    block_table: Optional[torch.Tensor]  # (B, max_pages) int32
    cache_batch_idx: Optional[torch.Tensor]  # (B,) int32: cache row of each sequence (contiguous caches)
    cache_leftpad: Optional[torch.Tensor]  # (B,) int32: first cache position of each sequence
    alibi_slopes: Optional[torch.Tensor]  # (B, Hq) float32
    sinks: Optional[torch.Tensor]  # (Hq,) float32
    scale: float
    window_left: int  # in positions; -1 = unbounded
    window_right: int  # 0 = causal
    softcap: float
    return_lse: bool
    needs_grad: bool  # autograd must see the call (only the reference backend differentiates it)

    bottom_right = True
    dropout_p = 0.0
    mask = None

    @property
    def device(self):
        return self.q.device

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def is_causal(self):
        return self.window_right == 0 and self.window_left < 0

    @property
    def paged(self):
        return self.block_table is not None

    @property
    def head_dims(self):
        return self.q.shape[-1], self.v_cache.shape[-1]

    @property
    def k(self):  # explain() prints q, k, v
        return self.k_cache

    @property
    def v(self):
        return self.v_cache

    @property
    def capacity(self):
        """Cache positions a sequence can hold."""
        if self.paged:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[1]

    def uses(self):
        """The features this call needs (pyattn.features)."""
        feats = [F.KVCACHE]
        if self.paged:
            feats.append(F.PAGED_KV_CACHE)
        if self.cache_batch_idx is not None:
            feats.append(F.CACHE_BATCH_IDX)
        if self.cache_leftpad is not None:
            feats.append(F.CACHE_LEFTPAD)
        if self.window_left >= 0 or self.window_right > 0:
            feats.append(F.SLIDING_WINDOW)
        if self.window_right == 0:
            feats.append(F.CAUSAL)
        if self.softcap:
            feats.append(F.SOFTCAP)
        if self.alibi_slopes is not None:
            feats.append(F.ALIBI)
        if self.sinks is not None:
            feats.append(F.SINKS)
        if self.return_lse:
            feats.append(F.RETURN_LSE)
        if self.q.shape[2] != self.k_cache.shape[2]:
            feats.append(F.GQA)
        if self.needs_grad:
            feats.append(F.KVCACHE_GRADIENT)
        return feats


def _int32_vector(name, t, batch, device):
    _check_tensor(name, t)
    if t.dtype != torch.int32 or t.shape != (batch,):
        raise AttentionInputError(f"{name} must be an int32 tensor of shape (B,) = ({batch},), got {t.dtype} "
                                  f"{_shape(t)}")
    if t.device != device:
        raise AttentionInputError(f"{name} is on {t.device} but q is on {device}")
    return t.contiguous()


def _check_new(k_new, v_new, q, k_cache, v_cache):
    if (k_new is None) != (v_new is None):
        raise AttentionInputError("k_new and v_new must be given together")
    if k_new is None:
        return 0
    for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
        _check_tensor(name, t)
        if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2:] != cache.shape[2:]:
            raise AttentionInputError(f"{name} must have shape (B, L_new, Hkv, D) = ({q.shape[0]}, L_new, "
                                      f"{cache.shape[2]}, {cache.shape[3]}), got {_shape(t)}")
        if t.dtype != cache.dtype or t.device != cache.device:
            raise AttentionTypeError(f"{name} must match the cache's dtype and device ({cache.dtype} on "
                                     f"{cache.device}), got {t.dtype} on {t.device}")
    if k_new.shape[1] != v_new.shape[1]:
        raise AttentionInputError(f"k_new {_shape(k_new)} and v_new {_shape(v_new)} must have the same length")
    if torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad):
        raise AttentionInputError("k_new and v_new are copied into the cache, which autograd does not follow: "
                                  "pass them detached (and differentiate through the cache instead)")
    return k_new.shape[1]


def _capturing(device):
    """Whether a CUDA graph is being captured on device's current stream: nothing can be read back then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _bad_pages(inp: KVCacheInputs):
    """(B, max_pages) bool: block_table entries that a sequence reads and that are not pages of the cache. Column c
    holds positions [c * page_size, (c + 1) * page_size); sequence b reads [cache_leftpad[b], seqlens_k[b])."""
    page_size, pages = inp.k_cache.shape[1], inp.k_cache.shape[0]
    starts = torch.arange(0, inp.block_table.shape[1] * page_size, page_size, device=inp.device)
    in_use = starts < inp.seqlens_k[:, None]
    if inp.cache_leftpad is not None:
        in_use &= starts + page_size > inp.cache_leftpad[:, None]
    return in_use & ((inp.block_table < 0) | (inp.block_table >= pages))


def _check_values(inp: KVCacheInputs, L_new):
    """Every index against the cache, so that a bad call writes nothing. The indices cross to the host in one
    transfer: one sync on a GPU per call, not one per check (a serving loop calls this in every layer); of the block
    table, only whether some page a sequence reads is out of range (where, only when one is). While a CUDA graph is
    being captured nothing can be read back: the caller vouches for the indices then."""
    if _capturing(inp.device):
        return
    B = inp.q.shape[0]
    vectors = [t for t in (inp.cache_seqlens, inp.cache_leftpad, inp.cache_batch_idx) if t is not None]
    bad_pages = _bad_pages(inp) if inp.paged else None
    flags = [bad_pages.any().view(1)] if bad_pages is not None else []
    host = torch.cat(vectors + flags).tolist()  # the one transfer (int32; the flag promoted)
    seqlens = host[:B]
    starts = host[B:2 * B] if inp.cache_leftpad is not None else [0] * B
    for b, (n, start) in enumerate(zip(seqlens, starts)):
        if n < 0 or n + L_new > inp.capacity:
            raise AttentionInputError(f"cache_seqlens[{b}] = {n} plus L_new = {L_new} new tokens does not fit the "
                                      f"cache capacity {inp.capacity} (k_cache {_shape(inp.k_cache)})")
        if not 0 <= start <= n:
            raise AttentionInputError(f"cache_leftpad[{b}] = {start} must lie in [0, cache_seqlens[{b}] = {n}]")
    if inp.cache_batch_idx is not None:
        rows = host[len(host) - B:]
        if any(not 0 <= r < inp.k_cache.shape[0] for r in rows):
            raise AttentionInputError(f"cache_batch_idx {rows} indexes outside the cache's {inp.k_cache.shape[0]} "
                                      f"rows (k_cache {_shape(inp.k_cache)})")
    if bad_pages is not None and host[-1]:
        b, p = (int(i) for i in bad_pages.nonzero()[0])
        raise AttentionInputError(f"block_table[{b}, {p}] = {int(inp.block_table[b, p])} is not a page of the cache "
                                  f"({inp.k_cache.shape[0]} pages of {inp.k_cache.shape[1]}, k_cache "
                                  f"{_shape(inp.k_cache)})")


def kvcache_inputs(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                   is_causal, window_size, softcap, alibi_slopes, sinks, scale, return_lse):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise AttentionInputError(f"{name} must be 4-D, got shape {_shape(t)} (q: (B, L, Hq, D); caches: "
                                      "(B_cache, S_max, Hkv, D), or (num_pages, page_size, Hkv, D) with block_table)")
    _check_qkv_types(q, k_cache, v_cache)
    B, L, Hq, E = q.shape
    shapes = _Shapes(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape[3] != E:
        raise AttentionInputError(f"q and k_cache must have the same head dim, got {shapes}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise AttentionInputError(f"k_cache and v_cache must agree in all but the last dim, got {shapes}")
    if k_cache.shape[2] == 0 or Hq % k_cache.shape[2]:
        raise AttentionInputError(f"q heads must be a multiple of the cache's kv heads, got {shapes}")
    if not isinstance(is_causal, bool):
        raise AttentionTypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = _int32_vector("cache_seqlens", cache_seqlens, B, q.device)
    if cache_leftpad is not None:
        cache_leftpad = _int32_vector("cache_leftpad", cache_leftpad, B, q.device)
    if block_table is not None:
        _check_tensor("block_table", block_table)
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise AttentionInputError(f"block_table must be int32 (B, max_pages) with B = {B}, got "
                                      f"{block_table.dtype} {_shape(block_table)}")
        if block_table.device != q.device:
            raise AttentionInputError(f"block_table is on {block_table.device} but q is on {q.device}")
        if cache_batch_idx is not None:
            raise AttentionInputError("cache_batch_idx picks rows of a contiguous cache; a paged cache is "
                                      "addressed by block_table alone")
        if k_cache.shape[1] == 0:
            raise AttentionInputError(f"a paged cache needs page_size >= 1, got {shapes}")
        block_table = block_table.contiguous()
    elif cache_batch_idx is not None:
        cache_batch_idx = _int32_vector("cache_batch_idx", cache_batch_idx, B, q.device)
    elif k_cache.shape[0] != B:
        raise AttentionInputError(f"k_cache must hold one row per sequence (B_cache = B = {B}) unless "
                                  f"cache_batch_idx picks the rows, got {shapes}")
    L_new = _check_new(k_new, v_new, q, k_cache, v_cache)
    _, softcap, _ = _options(0.0, softcap, "bottom_right", return_lse)
    left, right = _window(window_size, is_causal)
    sinks = _sinks(sinks, Hq, q)
    alibi = _alibi(alibi_slopes, (B, Hq), q.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, sinks, alibi))
    inp = KVCacheInputs(
        q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
        seqlens_k=cache_seqlens + L_new if L_new else cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        alibi_slopes=alibi.contiguous() if alibi is not None else None, sinks=sinks, scale=_scale(scale, E),
        window_left=left, window_right=right, softcap=softcap, return_lse=return_lse, needs_grad=needs_grad)
    if not torch.compiler.is_compiling():
        _check_values(inp, L_new)
    return inp
