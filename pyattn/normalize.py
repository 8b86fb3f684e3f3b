"""What a call's tensors become before the input record holds them: torch.autocast's dtype, and the batch dims of
query, key and value broadcast (GQA heads included) and flattened to the kernels' (B, H, rows, cols).

B flattens all leading batch dims into one. These are views (stride 0 where torch would broadcast) except in one case:
a tensor broadcast along some batch dims but not others (e.g. key (B2, H, S, E) with query (B1, B2, H, L, E)) has no
single B stride, so reshape copies it. 4-D and 3-D inputs, and inputs broadcast along all or none of the batch dims,
are never copied.
"""
import math

import torch

from .errors import AttentionInputError
from .validate import is_causal_bias

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")  # torch.is_autocast_enabled raises for others (e.g. meta)


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


def _gqa(query, key, value, shapes):
    """enable_gqa: -> key, value (repeated when their head counts differ), q's batch dims + heads, k/v's."""
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
    return key, value, (*outer, hq), (*outer, hk)


def batch_shapes(query, key, value, enable_gqa, shapes):
    """-> key, value, the batch dims (heads last) of the output and of key/value, as torch broadcasts them."""
    if enable_gqa and query.dim() >= 3:
        return _gqa(query, key, value, shapes)
    if query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:  # the usual call: nothing to broadcast
        return key, value, tuple(query.shape[:-2]), tuple(query.shape[:-2])
    try:
        batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    except RuntimeError:
        raise AttentionInputError(f"batch/head dims of query, key and value do not broadcast: {shapes}") from None
    return key, value, batch, batch


def as_bhld(t, batch_shape):
    """Expand t to batch_shape + t.shape[-2:] and view it as (B, H, rows, cols)."""
    if t.dim() == 4 and t.shape[:2] == batch_shape:  # the usual call: already so (a decode step's overhead)
        return t
    t = t.expand(*batch_shape, *t.shape[-2:])
    h = batch_shape[-1] if len(batch_shape) else 1
    return t.reshape(math.prod(batch_shape[:-1]), h, *t.shape[-2:])
