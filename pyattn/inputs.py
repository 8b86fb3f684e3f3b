"""The input record: user arguments validated and normalized once, so backends never re-parse them.

Every attention call becomes 4-D q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), an optional mask
(B, Hq, L, S), and plain options. These are views (stride 0 where torch would broadcast) except in one case:
B flattens all leading batch dims into one, and a tensor broadcast along some of them but not others
(e.g. key (B2, H, S, E) or a mask (B2, 1, L, S) with query (B1, B2, H, L, E)) has no single B stride, so
reshape copies it. 4-D and 3-D inputs, and inputs broadcast along all or none of the batch dims, are
never copied.
Causal masking is folded into the window (causal == window_right 0), so kernels have one band rule.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import features as F
from .errors import AttentionInputError, AttentionTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")  # torch.is_autocast_enabled raises for others (e.g. meta)


@dataclass
class AttnInputs:
    q: torch.Tensor  # (B, Hq, L, E)
    k: torch.Tensor  # (B, Hkv, S, E)
    v: torch.Tensor  # (B, Hkv, S, Ev)
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
    out_shape: tuple  # the user-facing output shape; lse is out_shape[:-1]
    sinks: Optional[torch.Tensor] = None  # (Hq,) float32 sink logits, or None

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

    def uses(self):
        """The features this call needs (pyattn.features): what backends check against."""
        feats = []
        if self.mask is not None:
            feats.append(F.BOOL_MASK if self.mask.dtype == torch.bool else F.FLOAT_MASK)
        if self.window_left >= 0 or self.window_right > 0:
            feats.append(F.SLIDING_WINDOW)
        if self.window_right == 0:
            feats.append(F.CAUSAL)
        if self.bottom_right:
            feats.append(F.BOTTOM_RIGHT)
        if self.softcap:
            feats.append(F.SOFTCAP)
        if self.alibi_slopes is not None:
            feats.append(F.ALIBI)
        if self.dropout_p > 0:
            feats.append(F.DROPOUT)
        if self.varlen:
            feats.append(F.VARLEN)
        if self.return_lse:
            feats.append(F.RETURN_LSE)
        if self.q.shape[1] != self.k.shape[1]:
            feats.append(F.GQA)
        if self.sinks is not None:
            feats.append(F.SINKS)
        return feats


def autocast(*tensors, dtype=None):
    """Under torch.autocast, attention runs in the autocast dtype (or dtype, when given), as torch's SDPA does:
    floating tensors are cast to it, float64 ones excepted (torch's autocast leaves them too)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in AUTOCAST_DEVICES \
            or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = dtype or torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 and not is_causal_bias(t) else t for t in tensors)


def _shape(t):
    return tuple(t.shape)


class _Shapes:
    """"name (shape), ..." of some tensors for error messages, formatted only when one is raised (a decode
    step's validation would otherwise spend more on this string than on its checks)."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __str__(self):
        return ", ".join(f"{name} {_shape(t)}" for name, t in self.tensors.items())

    def __format__(self, spec):
        return format(str(self), spec)


def _check_tensor(name, t, ndim_min=None):
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise AttentionInputError(f"{name} must have at least {ndim_min} dims (..., L, E), got shape {_shape(t)}")


def _check_qkv_types(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in FLOAT_DTYPES:
            raise AttentionTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype} "
                                     f"(shape {_shape(t)})")
    if not (query.dtype == key.dtype == value.dtype):
        raise AttentionTypeError(f"query, key and value must share a dtype, got query {query.dtype} {_shape(query)}, "
                                 f"key {key.dtype} {_shape(key)}, value {value.dtype} {_shape(value)}")
    if not (query.device == key.device == value.device):
        raise AttentionInputError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                                  f"{value.device}")


def _real(x):
    """x as a float when it is a real number as torch's float arguments take it (Python or NumPy number, one-element
    tensor), else None; bools are not numbers here."""
    if isinstance(x, torch.Tensor):
        return float(x) if x.numel() == 1 and x.dtype != torch.bool and not x.is_complex() else None
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None


def _scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    value = _real(scale)
    if value is None:
        raise AttentionTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return value


def _window(window_size, is_causal):
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


def _options(dropout_p, softcap, causal_alignment, return_lse):
    p = _real(dropout_p)
    if p is None or not 0.0 <= p <= 1.0:
        raise AttentionInputError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0):
        raise AttentionInputError(f"softcap must be a positive float or None, got {softcap!r}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise AttentionInputError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")
    if not isinstance(return_lse, bool):
        raise AttentionTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return p, float(softcap or 0.0), causal_alignment == "bottom_right"


def _alibi(alibi_slopes, batch_shape, device):
    """(Hq,) or batch_shape-broadcastable slopes -> (B, Hq) float32 view."""
    if alibi_slopes is None:
        return None
    _check_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise AttentionTypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype} "
                                 f"(shape {_shape(alibi_slopes)})")
    if alibi_slopes.device != device:
        raise AttentionInputError(f"alibi_slopes is on {alibi_slopes.device} but query is on {device}")
    if alibi_slopes.dim() not in (1, 2) or alibi_slopes.shape[-1] != batch_shape[-1]:
        raise AttentionInputError(f"alibi_slopes must have shape (H,) or (B, H) with H = {batch_shape[-1]} query "
                                  f"heads, got {_shape(alibi_slopes)}")
    try:
        slopes = alibi_slopes.expand(batch_shape)
    except RuntimeError:
        raise AttentionInputError(f"alibi_slopes of shape {_shape(alibi_slopes)} does not broadcast to the batch and "
                                  f"heads of query {tuple(batch_shape)}") from None
    return slopes.reshape(-1, batch_shape[-1])


def _sinks(sinks, heads, query):
    """(Hq,) sink logits -> float32 (Hq,) (another floating dtype is converted, differentiably), or float64 for
    float64 inputs (where float32 logits would cap the precision)."""
    device = query.device
    if sinks is None:
        return None
    _check_tensor("sinks", sinks)
    if not sinks.is_floating_point():
        raise AttentionTypeError(f"sinks must be a floating tensor (float32 per head), got {sinks.dtype} "
                                 f"(shape {_shape(sinks)})")
    if sinks.device != device:
        raise AttentionInputError(f"sinks is on {sinks.device} but query is on {device}")
    if sinks.dim() != 1 or sinks.shape[0] != heads:
        raise AttentionInputError(f"sinks must have shape (Hq,) = ({heads},), one logit per query head, got "
                                  f"{_shape(sinks)}")
    return sinks.to(torch.float64 if query.dtype == torch.float64 else torch.float32).contiguous()


def _mask(attn_mask, out_batch, L, S, query):
    """attn_mask broadcastable to out_batch + (L, S) -> (B, Hq, L, S) view (stride 0 where broadcast)."""
    if attn_mask is None:
        return None
    _check_tensor("attn_mask", attn_mask)
    if attn_mask.device != query.device:
        raise AttentionInputError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        raise AttentionTypeError(f"attn_mask must be bool, float32 or the query's dtype {query.dtype}, "
                                 f"got {attn_mask.dtype} (shape {_shape(attn_mask)})")
    full = tuple(out_batch) + (L, S)
    if attn_mask.dim() < 2 or attn_mask.dim() > len(full):
        raise AttentionInputError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to (..., L, S) = {full}")
    try:
        if torch.broadcast_shapes(attn_mask.shape, full) != full:
            raise RuntimeError
    except RuntimeError:
        raise AttentionInputError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to (..., L, S) = {full} "
                                  f"(query {_shape(query)})") from None
    return attn_mask.expand(full).reshape(math.prod(full[:-3]), full[-3] if len(full) > 2 else 1, L, S)


def is_causal_bias(attn_mask):
    """torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right): a Tensor subclass whose storage
    is meaningless, so it must never be read as a mask."""
    return isinstance(attn_mask, CausalBias)


BIAS_ALIGNMENT = {CausalVariant.UPPER_LEFT: "top_left", CausalVariant.LOWER_RIGHT: "bottom_right"}


def _causal_bias(bias, L, S, causal_alignment, shapes):
    """A CausalBias -> the causal_alignment of its band, checked against the call (what torch's masks would be)."""
    name = f"attn_mask causal_{'upper_left' if bias.variant == CausalVariant.UPPER_LEFT else 'lower_right'}" \
           f"({bias.seq_len_q}, {bias.seq_len_kv})"
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise AttentionInputError(f"{name} does not match query length L={L} and key length S={S} ({shapes})")
    alignment = BIAS_ALIGNMENT[bias.variant]
    if causal_alignment == "bottom_right" and alignment == "top_left":  # "top_left" is also the default: the bias wins
        raise AttentionInputError(f"{name} is top-left aligned but causal_alignment='bottom_right' ({shapes})")
    return alignment


def _check_mask_and_causal(attn_mask, is_causal, shapes):
    if is_causal and attn_mask is not None:
        kind = "a CausalBias" if is_causal_bias(attn_mask) else f"a mask of shape {_shape(attn_mask)}"
        raise AttentionInputError(
            f"attn_mask ({kind}) and is_causal=True must not be combined, as torch documents ({shapes}); "
            "pass one of them, or window_size=(-1, 0) with attn_mask for a mask inside the causal band")


def _as_bhld(t, batch_shape):
    """Expand t to batch_shape + t.shape[-2:] and view it as (B, H, rows, cols)."""
    if t.dim() == 4 and t.shape[:2] == batch_shape:  # the usual call: already so (a decode step's overhead)
        return t
    t = t.expand(*batch_shape, *t.shape[-2:])
    h = batch_shape[-1] if len(batch_shape) else 1
    return t.reshape(math.prod(batch_shape[:-1]), h, *t.shape[-2:])


def dense_inputs(query, key, value, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left", return_lse=False,
                 sinks=None):
    """scaled_dot_product_attention's arguments -> AttnInputs (dense_outputs maps the results back)."""
    query, key, value, attn_mask = autocast(query, key, value, attn_mask)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t, ndim_min=2)
    _check_qkv_types(query, key, value)
    L, E = query.shape[-2:]
    S, Ek = key.shape[-2:]
    Sv, Ev = value.shape[-2:]
    shapes = _Shapes(query=query, key=key, value=value)
    if Ek != E:
        raise AttentionInputError(f"query and key must have the same head dim E (last dim), got {shapes}")
    if Sv != S:
        raise AttentionInputError(f"key and value must have the same sequence length S (dim -2), got {shapes}")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise AttentionTypeError(f"is_causal and enable_gqa must be bools, got {type(is_causal).__name__} and "
                                 f"{type(enable_gqa).__name__}")
    _check_mask_and_causal(attn_mask, is_causal, shapes)
    if is_causal_bias(attn_mask):  # the kernels' causal band in the bias's alignment: no L x S tensor
        causal_alignment = _causal_bias(attn_mask, L, S, causal_alignment, shapes)
        attn_mask, is_causal = None, True
    if enable_gqa and query.dim() >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv and hk and hv and hq % hk == 0 and hq % hv == 0:
            # torch repeats key and value each to hq heads. Here both go to the larger count when it is a multiple
            # of the smaller (else to hq), so q head h still meets key head h // (hq / hk), value h // (hq / hv)
            h = max(hk, hv) if max(hk, hv) % min(hk, hv) == 0 else hq
            key, value = key.repeat_interleave(h // hk, dim=-3), value.repeat_interleave(h // hv, dim=-3)
            hk = hv = h
        if hk != hv:
            raise AttentionInputError(f"enable_gqa: key and value heads (dim -3) must divide the query heads, "
                                      f"got {shapes}")
        if (hq % hk if hk else hq):  # no heads at all is fine, as in torch
            raise AttentionInputError(f"enable_gqa: query heads (dim -3) must be a multiple of key/value heads, "
                                      f"got {shapes}")
        try:
            outer = query.shape[:-3] if query.shape[:-3] == key.shape[:-3] == value.shape[:-3] else \
                torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        except RuntimeError:
            raise AttentionInputError(f"batch dims of query, key and value do not broadcast: {shapes}") from None
        q_batch, kv_batch = (*outer, hq), (*outer, hk)
    elif query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:  # the usual call: nothing to broadcast
        q_batch = kv_batch = query.shape[:-2]
    else:
        try:
            q_batch = kv_batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        except RuntimeError:
            raise AttentionInputError(f"batch/head dims of query, key and value do not broadcast: {shapes}") from None
    dropout_p, softcap, bottom_right = _options(dropout_p, softcap, causal_alignment, return_lse)
    left, right = _window(window_size, is_causal)
    q_batch = tuple(q_batch)
    return AttnInputs(
        q=_as_bhld(query, q_batch), k=_as_bhld(key, tuple(kv_batch)), v=_as_bhld(value, tuple(kv_batch)),
        mask=_mask(attn_mask, q_batch, L, S, query),
        alibi_slopes=_alibi(alibi_slopes, q_batch if q_batch else (1,), query.device),
        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=L, max_seqlen_k=S,
        scale=_scale(scale, E), window_left=left, window_right=right, bottom_right=bottom_right,
        softcap=softcap, dropout_p=dropout_p, return_lse=return_lse, out_shape=(*q_batch, L, Ev),
        sinks=_sinks(sinks, q_batch[-1] if q_batch else 1, query))


def dense_outputs(inp: AttnInputs, out, lse):
    """out (B, Hq, L, Ev), lse (B, Hq, L) -> out in the user's shape, or (out, lse) with return_lse. A 4-D out is
    returned as it is: reshape to the same shape may restride its size-1 dims, and its strides follow q's as torch's."""
    if tuple(out.shape) != tuple(inp.out_shape):
        out = out.reshape(inp.out_shape)
    return (out, lse.reshape(inp.out_shape[:-1])) if inp.return_lse else out


def _check_cu_seqlens(name, cu, total, max_seqlen):
    _check_tensor(name, cu)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise AttentionInputError(f"{name} must be a 1-D int32 tensor of size batch + 1, got {cu.dtype} {_shape(cu)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise AttentionInputError(f"max_seqlen for {name} must be a non-negative int, got {max_seqlen!r}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():  # values are cheap to check only here
        lengths = cu.diff()
        if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) > total:
            raise AttentionInputError(f"{name} must start at 0, never decrease and end at most at {total} rows, "
                                      f"got {cu.tolist()}")
        if lengths.numel() and int(lengths.max()) > max_seqlen:
            raise AttentionInputError(f"{name} holds a sequence of length {int(lengths.max())} > its max_seqlen "
                                      f"{max_seqlen}")


def varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False, scale=None,
                  window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left", dropout_p=0.0,
                  return_lse=False, sinks=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 3:
            raise AttentionInputError(f"{name} must be 3-D (total, heads, head_dim), got shape {_shape(t)}")
    _check_qkv_types(q, k, v)
    shapes = _Shapes(q=q, k=k, v=v)
    if k.shape[2] != q.shape[2]:
        raise AttentionInputError(f"q and k must have the same head dim, got {shapes}")
    if k.shape[:2] != v.shape[:2]:
        raise AttentionInputError(f"k and v must have the same total length and heads, got {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise AttentionInputError(f"q heads must be a multiple of k/v heads, got {shapes}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise AttentionInputError(f"cu_seqlens_q and cu_seqlens_k must have the same size (batch + 1), got "
                                  f"{_shape(cu_seqlens_q)} and {_shape(cu_seqlens_k)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device:
            raise AttentionInputError(f"{name} is on {cu.device} but q is on {q.device}")
    if not isinstance(is_causal, bool):
        raise AttentionTypeError("is_causal must be a bool")
    dropout_p, softcap, bottom_right = _options(dropout_p, softcap, causal_alignment, return_lse)
    left, right = _window(window_size, is_causal)
    batch, hq = cu_seqlens_q.numel() - 1, q.shape[1]
    return AttnInputs(
        q=q.transpose(0, 1).unsqueeze(0), k=k.transpose(0, 1).unsqueeze(0), v=v.transpose(0, 1).unsqueeze(0),
        mask=None, alibi_slopes=_alibi(alibi_slopes, (batch, hq), q.device),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, scale=_scale(scale, q.shape[2]), window_left=left, window_right=right,
        bottom_right=bottom_right, softcap=softcap, dropout_p=dropout_p, return_lse=return_lse,
        out_shape=(q.shape[0], hq, v.shape[2]), sinks=_sinks(sinks, hq, q))
