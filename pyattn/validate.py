"""The argument checks of every public entry point, in one place: each checks one user argument (or a few that must
agree) and returns it normalized; messages name the argument and the shapes. The builders of pyattn/inputs.py call
them; they never touch a backend.
"""
import math
import numbers
import sys

import torch

from .block_mask import is_block_mask
from .errors import AttentionInputError, AttentionTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def shape(t):
    return tuple(t.shape)


class Shapes:
    """"name (shape), ..." of some tensors for error messages, formatted only when one is raised (a decode
    step's validation would otherwise spend more on this string than on its checks)."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __str__(self):
        return ", ".join(f"{name} {shape(t)}" for name, t in self.tensors.items())

    def __format__(self, spec):
        return format(str(self), spec)


def tensor(name, t, ndim_min=None):
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise AttentionInputError(f"{name} must have at least {ndim_min} dims (..., L, E), got shape {shape(t)}")


def tensors_of_rank(ndim, layout, **tensors):
    """Each of tensors is a tensor of ndim dims; layout says which, for the message."""
    for name, t in tensors.items():
        tensor(name, t)
        if t.dim() != ndim:
            raise AttentionInputError(f"{name} must be {ndim}-D {layout}, got shape {shape(t)}")


def qkv_types(**qkv):
    """The query, key and value tensors (by their argument names): one floating dtype, one device."""
    for name, t in qkv.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AttentionTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype} "
                                     f"(shape {shape(t)})")
    (qn, q), (kn, k), (vn, v) = qkv.items()
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionTypeError(f"{qn}, {kn} and {vn} must share a dtype, got {qn} {q.dtype} {shape(q)}, "
                                 f"{kn} {k.dtype} {shape(k)}, {vn} {v.dtype} {shape(v)}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"{qn}, {kn} and {vn} must be on one device, got {q.device}, {k.device}, {v.device}")


def flag(name, value):
    if not isinstance(value, bool):
        raise AttentionTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def real(x):
    """x as a float when it is a real number as torch's float arguments take it (Python or NumPy number, one-element
    tensor), else None; bools are not numbers here."""
    if isinstance(x, torch.Tensor):
        return float(x) if x.numel() == 1 and x.dtype != torch.bool and not x.is_complex() else None
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None


def scale(value, head_dim):
    if value is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    number = real(value)
    if number is None:
        raise AttentionTypeError(f"scale must be a float or None, got {type(value).__name__}")
    return number


def window(window_size, is_causal):
    """(left, right) in the kernels' terms: -1 = unbounded; causal folds into right = 0 (one band rule)."""
    if window_size is None:
        left, right = -1, -1
    else:
        if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
                and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
            raise AttentionInputError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
        left, right = window_size
        if left < -1 or right < -1:
            raise AttentionInputError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def options(dropout_p, softcap, causal_alignment, return_lse):
    """-> dropout_p, softcap (0 = off), bottom_right."""
    p = real(dropout_p)
    if p is None or not 0.0 <= p <= 1.0:
        raise AttentionInputError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0):
        raise AttentionInputError(f"softcap must be a positive float or None, got {softcap!r}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise AttentionInputError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")
    flag("return_lse", return_lse)
    return p, float(softcap or 0.0), causal_alignment == "bottom_right"


def alibi(alibi_slopes, batch_shape, device):
    """(Hq,) or batch_shape-broadcastable slopes -> (B, Hq) float32 view."""
    if alibi_slopes is None:
        return None
    tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise AttentionTypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype} "
                                 f"(shape {shape(alibi_slopes)})")
    if alibi_slopes.device != device:
        raise AttentionInputError(f"alibi_slopes is on {alibi_slopes.device} but query is on {device}")
    if alibi_slopes.dim() not in (1, 2) or alibi_slopes.shape[-1] != batch_shape[-1]:
        raise AttentionInputError(f"alibi_slopes must have shape (H,) or (B, H) with H = {batch_shape[-1]} query "
                                  f"heads, got {shape(alibi_slopes)}")
    try:
        slopes = alibi_slopes.expand(batch_shape)
    except RuntimeError:
        raise AttentionInputError(f"alibi_slopes of shape {shape(alibi_slopes)} does not broadcast to the batch and "
                                  f"heads of query {tuple(batch_shape)}") from None
    return slopes.reshape(-1, batch_shape[-1])


def sinks(logits, heads, query):
    """(Hq,) sink logits -> float32 (Hq,) (another floating dtype is converted, differentiably), or float64 for
    float64 inputs (where float32 logits would cap the precision)."""
    device = query.device
    if logits is None:
        return None
    tensor("sinks", logits)
    if not logits.is_floating_point():
        raise AttentionTypeError(f"sinks must be a floating tensor (float32 per head), got {logits.dtype} "
                                 f"(shape {shape(logits)})")
    if logits.device != device:
        raise AttentionInputError(f"sinks is on {logits.device} but query is on {device}")
    if logits.dim() != 1 or logits.shape[0] != heads:
        raise AttentionInputError(f"sinks must have shape (Hq,) = ({heads},), one logit per query head, got "
                                  f"{shape(logits)}")
    return logits.to(torch.float64 if query.dtype == torch.float64 else torch.float32).contiguous()


def mask(attn_mask, out_batch, L, S, query):
    """attn_mask broadcastable to out_batch + (L, S) -> (B, Hq, L, S) view (stride 0 where broadcast)."""
    if attn_mask is None:
        return None
    tensor("attn_mask", attn_mask)
    if attn_mask.device != query.device:
        raise AttentionInputError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        raise AttentionTypeError(f"attn_mask must be bool, float32 or the query's dtype {query.dtype}, "
                                 f"got {attn_mask.dtype} (shape {shape(attn_mask)})")
    full = tuple(out_batch) + (L, S)
    if attn_mask.dim() < 2 or attn_mask.dim() > len(full):
        raise AttentionInputError(f"attn_mask of shape {shape(attn_mask)} does not broadcast to (..., L, S) = {full}")
    try:
        if torch.broadcast_shapes(attn_mask.shape, full) != full:
            raise RuntimeError
    except RuntimeError:
        raise AttentionInputError(f"attn_mask of shape {shape(attn_mask)} does not broadcast to (..., L, S) = {full} "
                                  f"(query {shape(query)})") from None
    return attn_mask.expand(full).reshape(math.prod(full[:-3]), full[-3] if len(full) > 2 else 1, L, S)


def is_causal_bias(attn_mask):
    """torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right): a Tensor subclass whose storage
    is meaningless, so it must never be read as a mask. Looked up where torch has loaded it: no CausalBias exists
    before its module is imported, and importing it at pyattn's import would load torch._dynamo (and triton) there."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(attn_mask, bias.CausalBias)


def causal_bias(bias, L, S, causal_alignment, shapes):
    """A CausalBias -> the causal_alignment of its band, checked against the call (what torch's masks would be)."""
    from torch.nn.attention.bias import CausalVariant
    upper_left = bias.variant == CausalVariant.UPPER_LEFT
    name = f"attn_mask causal_{'upper_left' if upper_left else 'lower_right'}({bias.seq_len_q}, {bias.seq_len_kv})"
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise AttentionInputError(f"{name} does not match query length L={L} and key length S={S} ({shapes})")
    alignment = "top_left" if upper_left else "bottom_right"
    if causal_alignment == "bottom_right" and alignment == "top_left":  # "top_left" is also the default: the bias wins
        raise AttentionInputError(f"{name} is top-left aligned but causal_alignment='bottom_right' ({shapes})")
    return alignment


def mask_and_causal(attn_mask, is_causal, shapes):
    if is_causal and attn_mask is not None:
        kind = ("a CausalBias" if is_causal_bias(attn_mask) else
                f"a {'BlockMask' if is_block_mask(attn_mask) else 'mask'} of shape {shape(attn_mask)}")
        raise AttentionInputError(
            f"attn_mask ({kind}) and is_causal=True must not be combined, as torch documents ({shapes}); "
            "pass one of them, or window_size=(-1, 0) with attn_mask for a mask inside the causal band")


def cu_seqlens(name, cu, total, max_seqlen, device):
    tensor(name, cu)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise AttentionInputError(f"{name} must be a 1-D int32 tensor of size batch + 1, got {cu.dtype} {shape(cu)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise AttentionInputError(f"max_seqlen for {name} must be a non-negative int, got {max_seqlen!r}")
    if cu.device != device:
        raise AttentionInputError(f"{name} is on {cu.device} but q is on {device}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():  # values are cheap to check only here
        lengths = cu.diff()
        if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) > total:
            raise AttentionInputError(f"{name} must start at 0, never decrease and end at most at {total} rows, "
                                      f"got {cu.tolist()}")
        if lengths.numel() and int(lengths.max()) > max_seqlen:
            raise AttentionInputError(f"{name} holds a sequence of length {int(lengths.max())} > its max_seqlen "
                                      f"{max_seqlen}")


def int32_vector(name, t, batch, device):
    """A (B,) int32 index vector of kvcache_attention -> contiguous."""
    tensor(name, t)
    if t.dtype != torch.int32 or t.shape != (batch,):
        raise AttentionInputError(f"{name} must be an int32 tensor of shape (B,) = ({batch},), got {t.dtype} "
                                  f"{shape(t)}")
    if t.device != device:
        raise AttentionInputError(f"{name} is on {t.device} but q is on {device}")
    return t.contiguous()


def new_keys(k_new, v_new, q, k_cache, v_cache):
    """k_new/v_new (B, L_new, Hkv, D), appended to the caches -> L_new (0 without them)."""
    if (k_new is None) != (v_new is None):
        raise AttentionInputError("k_new and v_new must be given together")
    if k_new is None:
        return 0
    for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
        tensor(name, t)
        if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2:] != cache.shape[2:]:
            raise AttentionInputError(f"{name} must have shape (B, L_new, Hkv, D) = ({q.shape[0]}, L_new, "
                                      f"{cache.shape[2]}, {cache.shape[3]}), got {shape(t)}")
        if t.dtype != cache.dtype or t.device != cache.device:
            raise AttentionTypeError(f"{name} must match the cache's dtype and device ({cache.dtype} on "
                                     f"{cache.device}), got {t.dtype} on {t.device}")
    if k_new.shape[1] != v_new.shape[1]:
        raise AttentionInputError(f"k_new {shape(k_new)} and v_new {shape(v_new)} must have the same length")
    if torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad):
        raise AttentionInputError("k_new and v_new are copied into the cache, which autograd does not follow: "
                                  "pass them detached (and differentiate through the cache instead)")
    return k_new.shape[1]


def cache_rows(block_table, cache_batch_idx, q, k_cache, shapes):
    """How sequences find their cache rows: block_table (B, max_pages) int32 pages, else cache_batch_idx (B,) int32
    rows, else row b -> block_table, cache_batch_idx (contiguous)."""
    B = q.shape[0]
    if block_table is not None:
        tensor("block_table", block_table)
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise AttentionInputError(f"block_table must be int32 (B, max_pages) with B = {B}, got "
                                      f"{block_table.dtype} {shape(block_table)}")
        if block_table.device != q.device:
            raise AttentionInputError(f"block_table is on {block_table.device} but q is on {q.device}")
        if cache_batch_idx is not None:
            raise AttentionInputError("cache_batch_idx picks rows of a contiguous cache; a paged cache is "
                                      "addressed by block_table alone")
        if k_cache.shape[1] == 0:
            raise AttentionInputError(f"a paged cache needs page_size >= 1, got {shapes}")
        return block_table.contiguous(), None
    if cache_batch_idx is not None:
        return None, int32_vector("cache_batch_idx", cache_batch_idx, B, q.device)
    if k_cache.shape[0] != B:
        raise AttentionInputError(f"k_cache must hold one row per sequence (B_cache = B = {B}) unless "
                                  f"cache_batch_idx picks the rows, got {shapes}")
    return None, None


def _capturing(device):
    """Whether a CUDA graph is being captured on device's current stream: nothing can be read back then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _bad_pages(cache):
    """(B, max_pages) bool: block_table entries that a sequence reads and that are not pages of the cache. Column c
    holds positions [c * page_size, (c + 1) * page_size); sequence b reads [cache_leftpad[b], seqlens_k[b])."""
    page_size, pages = cache.k_cache.shape[1], cache.k_cache.shape[0]
    starts = torch.arange(0, cache.block_table.shape[1] * page_size, page_size, device=cache.k_cache.device)
    in_use = starts < cache.seqlens_k[:, None]
    if cache.cache_leftpad is not None:
        in_use &= starts + page_size > cache.cache_leftpad[:, None]
    return in_use & ((cache.block_table < 0) | (cache.block_table >= pages))


def _capacity_source(cache):
    """What limits a sequence's cache positions, for messages."""
    if cache.paged:
        pages, page_size = cache.block_table.shape[1], cache.k_cache.shape[1]
        return (f"block_table {shape(cache.block_table)}: {pages} pages of page_size {page_size} from k_cache "
                f"{shape(cache.k_cache)}")
    return f"the sequence dim of k_cache {shape(cache.k_cache)}"


def cache_indices(cache, L_new):
    """Every index of a KVCache (pyattn/inputs.py) against the cache, so that a bad call writes nothing. The indices
    cross to the host in one transfer: one sync on a GPU per call, not one per check (a serving loop calls this in
    every layer); of the block table, only whether some page a sequence reads is out of range (where, only when one
    is). While a CUDA graph is being captured nothing can be read back: the caller vouches for the indices then."""
    device = cache.k_cache.device
    if _capturing(device):
        return
    B = cache.cache_seqlens.shape[0]
    vectors = [t for t in (cache.cache_seqlens, cache.cache_leftpad, cache.cache_batch_idx) if t is not None]
    bad_pages = _bad_pages(cache) if cache.paged else None
    flags = [bad_pages.any().view(1)] if bad_pages is not None else []
    host = torch.cat(vectors + flags).tolist()  # the one transfer (int32; the flag promoted)
    seqlens = host[:B]
    starts = host[B:2 * B] if cache.cache_leftpad is not None else [0] * B
    for b, (n, start) in enumerate(zip(seqlens, starts)):
        if n < 0 or n + L_new > cache.capacity:
            raise AttentionInputError(f"cache_seqlens[{b}] = {n} plus L_new = {L_new} new tokens does not fit the "
                                      f"cache capacity {cache.capacity} ({_capacity_source(cache)})")
        if not 0 <= start <= n:
            raise AttentionInputError(f"cache_leftpad[{b}] = {start} must lie in [0, cache_seqlens[{b}] = {n}]")
    if cache.cache_batch_idx is not None:
        rows = host[len(host) - B:]
        if any(not 0 <= r < cache.k_cache.shape[0] for r in rows):
            raise AttentionInputError(f"cache_batch_idx {rows} indexes outside the cache's {cache.k_cache.shape[0]} "
                                      f"rows (k_cache {shape(cache.k_cache)})")
    if bad_pages is not None and host[-1]:
        b, p = (int(i) for i in bad_pages.nonzero()[0])
        raise AttentionInputError(f"block_table[{b}, {p}] = {int(cache.block_table[b, p])} is not a page of the cache "
                                  f"({cache.k_cache.shape[0]} pages of {cache.k_cache.shape[1]}, k_cache "
                                  f"{shape(cache.k_cache)})")
