"""The input record: user arguments validated (pyattn/validate.py) and normalized (pyattn/normalize.py) once, so
backends never re-parse them. One record for every entry point; each builder below only translates its arguments.

Every call becomes 4-D q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), an optional mask (B, Hq, L, S), and
plain options; a KV-cache call adds its cache part, a BlockMask its block part (block_states, block_bits, block_q,
block_k: named as the ops' arguments, so op_args.pick passes them), a Python score_mod its callable. Causal masking is
folded into the window (causal == window_right 0), so kernels have one band rule.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import block_mask as block_masks
from . import features as F
from . import normalize, score_mods, torch_words, validate
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
    # a BlockMask (pyattn/block_mask.py): block (qb, kb) of rows [qb * block_q, ...) x keys [kb * block_k, ...) is
    # 0 empty, 1 full, 2 + i partial (masked by block_bits[i]); it ANDs with every other mask
    block_states: Optional[torch.Tensor] = None  # (1|B, 1|Hq, ceil(L / block_q), ceil(S / block_k)) int32
    block_bits: Optional[torch.Tensor] = None  # (P, block_q, ceil(block_k / 8)) uint8, bit c % 8 of byte c // 8
    block_q: int = 0
    block_k: int = 0
    # an arbitrary score_mod(score, b, h, q_idx, kv_idx) (torch's signature), applied after scale: reference only
    score_mod: Optional[Callable] = None

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
            (self.block_states is not None, F.BLOCK_MASK),
            (self.score_mod is not None, F.SCORE_MOD),
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
        # torch's SDPA takes no BlockMask: its words are those for the call without it
        mask = None if block_masks.is_block_mask(attn_mask) else attn_mask
        words = torch_words.sdpa_refusal(query, key, value, mask, dropout_p, is_causal, scale, enable_gqa)
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
    block_mask = None
    if block_masks.is_block_mask(attn_mask):  # kept as blocks: never an L x S tensor
        block_mask, attn_mask = attn_mask, None
    if validate.is_causal_bias(attn_mask):  # the kernels' causal band in the bias's alignment: no L x S tensor
        causal_alignment = validate.causal_bias(attn_mask, L, S, causal_alignment, shapes)
        attn_mask, is_causal = None, True
    key, value, q_batch, kv_batch = normalize.batch_shapes(query, key, value, enable_gqa, shapes)
    dropout_p, softcap, bottom_right = validate.options(dropout_p, softcap, causal_alignment, return_lse)
    left, right = validate.window(window_size, is_causal)
    q = normalize.as_bhld(query, q_batch)
    return AttnInputs(
        q=q, k=normalize.as_bhld(key, kv_batch), v=normalize.as_bhld(value, kv_batch),
        mask=validate.mask(attn_mask, q_batch, L, S, query),
        alibi_slopes=validate.alibi(alibi_slopes, q_batch if q_batch else (1,), query.device),
        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=L, max_seqlen_k=S,
        scale=validate.scale(scale, E), window_left=left, window_right=right, bottom_right=bottom_right,
        softcap=softcap, dropout_p=dropout_p, return_lse=return_lse, out_shape=(*q_batch, L, Ev),
        sinks=validate.sinks(sinks, q_batch[-1] if q_batch else 1, query), **_block_part(block_mask, q, S))


def _block_part(block_mask, q, S):
    """AttnInputs' block fields for a BlockMask (or None) over q (B, Hq, L, E) and keys of length S."""
    if block_mask is None:
        return {}
    B, Hq, L, _ = q.shape
    blocks = block_masks.block_sparse(block_mask, B, Hq, L, S, q.device)
    return dict(block_states=blocks.states, block_bits=blocks.bits, block_q=blocks.block_q, block_k=blocks.block_k)


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


# torch's flex_attention kernel_options that only tune how its kernels run (torch's FlexKernelOptions; fwd_/bwd_
# prefixes too), or promise what pyattn does not rely on (ROWS_GUARANTEED_SAFE, BLOCKS_ARE_CONTIGUOUS): ignored.
# PRESCALE_QK only changes rounding. Anything else (OUTPUT_*, another BACKEND, unknown keys) is refused.
TUNING_OPTIONS = frozenset({"num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2",
                            "BLOCK_N2", "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ",
                            "FORCE_USE_FLEX_ATTENTION", "USE_TMA", "kpack", "matrix_instr_nonkdim", "waves_per_eu"})


def _kernel_options(kernel_options):
    if kernel_options is None:
        return
    if not isinstance(kernel_options, dict):
        raise AttentionTypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    for name, value in kernel_options.items():
        if name == "BACKEND" and value == "AUTO":
            continue
        base = name.removeprefix("fwd_").removeprefix("bwd_") if isinstance(name, str) else name
        if base not in TUNING_OPTIONS:
            raise AttentionInputError(f"kernel_options[{name!r}] = {value!r} is not a tuning hint pyattn can ignore "
                                      f"(it takes {sorted(TUNING_OPTIONS)} and BACKEND='AUTO'; pick pyattn's kernels "
                                      "with backend=...)")


def _wants_lse(return_lse, return_aux):
    """flex_attention's return_lse / return_aux (torch's AuxRequest) -> whether lse is computed."""
    validate.flag("return_lse", return_lse)
    if return_aux is None:
        return return_lse
    if return_lse:
        raise AttentionInputError("Cannot specify both return_lse and return_aux; pass return_aux=AuxRequest(lse=True)")
    if not (hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise AttentionTypeError(f"return_aux must be an AuxRequest or None, got {type(return_aux).__name__}")
    if return_aux.max_scores:
        raise AttentionInputError("return_aux=AuxRequest(max_scores=True): pyattn's kernels do not return max scores "
                                  "(torch's CPU flex_attention neither); ask for lse")
    return bool(return_aux.lse)


def flex_inputs(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False,
                kernel_options=None, return_aux=None):
    """flex_attention's arguments -> AttnInputs (flex_outputs maps the results back). A score_mod of
    pyattn.score_mods becomes the option its kernels have; another callable stays a score_mod (reference math). Where
    torch's flex_attention refuses the same arguments, the error starts with torch's words."""
    query, key, value = normalize.autocast(query, key, value)
    try:
        return _flex(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                     return_aux)
    except AttentionInputError as e:
        words = torch_words.flex_refusal(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                                         kernel_options, return_aux)
        raise torch_words.with_torch_words(e, words) from None


def _flex(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options, return_aux):
    validate.tensors_of_rank(4, "(B, H, L, E)", query=query, key=key, value=value)
    validate.qkv_types(query=query, key=key, value=value)
    (B, Hq, L, E), (Bkv, Hkv, S, Ek), (Bv, Hv, Sv, Ev) = query.shape, key.shape, value.shape
    shapes = Shapes(query=query, key=key, value=value)
    if Ek != E:
        raise AttentionInputError(f"query and key must have the same embedding dim E, got {shapes}")
    if (Bv, Hv, Sv) != (Bkv, Hkv, S):
        raise AttentionInputError(f"key and value must agree in all but the last dim, got {shapes}")
    if not validate.flag("enable_gqa", enable_gqa) and Hq != Hkv:
        raise AttentionInputError(f"query and key/value must have the same number of heads without enable_gqa, got "
                                  f"{shapes}")
    if Hkv == 0 or Hq % Hkv:
        raise AttentionInputError(f"enable_gqa: query heads must be a multiple of key/value heads, got {shapes}")
    if Bkv != B and (Bkv != 1 or block_mask is None or block_mask.kv_num_blocks.shape[0] != B):
        raise AttentionInputError(f"key/value batch must be the query's, or 1 with a block_mask of the query's batch, "
                                  f"got {shapes}")
    want_lse = _wants_lse(return_lse, return_aux)
    _kernel_options(kernel_options)
    if block_mask is not None and not block_masks.is_block_mask(block_mask):
        raise AttentionTypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask or None, got "
                                 f"{type(block_mask).__name__}")
    if score_mod is not None and not callable(score_mod):
        raise AttentionTypeError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    fusion = score_mod.fuse(B, Hq, L, S, query) if isinstance(score_mod, score_mods.FusedScoreMod) else None
    fused = dict([fusion]) if fusion else {}
    mask = fused.pop("mask", None)
    return AttnInputs(
        q=query, k=key.expand(B, -1, -1, -1), v=value.expand(B, -1, -1, -1),
        mask=validate.mask(mask, (B, Hq), L, S, query), alibi_slopes=fused.pop("alibi_slopes", None),
        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=L, max_seqlen_k=S, scale=validate.scale(scale, E),
        window_left=-1, window_right=-1, bottom_right=False, softcap=fused.pop("softcap", 0.0), dropout_p=0.0,
        return_lse=want_lse, out_shape=(B, Hq, L, Ev),
        score_mod=None if fusion else score_mod, **_block_part(block_mask, query, S))


def flex_outputs(inp: AttnInputs, out, lse, return_aux):
    """out (B, Hq, L, Ev), lse (B, Hq, L) -> what flex_attention returns: out, (out, lse) with return_lse, or
    (out, AuxOutput) with return_aux."""
    if return_aux is not None:
        from torch.nn.attention.flex_attention import AuxOutput
        return out, AuxOutput(lse=lse if return_aux.lse else None, max_scores=None)
    return (out, lse) if inp.return_lse else out
