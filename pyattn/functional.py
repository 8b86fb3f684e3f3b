"""The public functions: validate -> normalize (pyattn.inputs) -> choose a backend -> run -> user shapes."""
import torch

from . import backends
from .inputs import dense_inputs, varlen_inputs


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")  # torch.is_autocast_enabled raises for others (e.g. meta)


def _autocast(*tensors):
    """Under torch.autocast, attention runs in the autocast dtype, as torch's SDPA does."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in AUTOCAST_DEVICES \
            or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _run(inp, backend):
    out, lse = backends.choose(inp, backend).forward(inp)
    return out, lse


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window_size=None, softcap=None, alibi_slopes=None,
                                 causal_alignment="top_left", return_lse=False, backend=None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, plus FlashAttention's extras.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev), and with return_lse also the
    float32 log-sum-exp (..., L) of the scores. See DESIGN.md's API contract.
    """
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    inp = dense_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                       softcap, alibi_slopes, causal_alignment, return_lse)
    out, lse = _run(inp, backend)
    out = out.reshape(inp.out_shape)
    return (out, lse.reshape(inp.out_shape[:-1])) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                     scale=None, window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left",
                     dropout_p=0.0, return_lse=False, backend=None):
    """Packed sequences: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev) -> (total_q, Hq, Ev).

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v;
    it attends only within itself. With return_lse, also lse (Hq, total_q) float32.
    """
    q, k, v = _autocast(q, k, v)
    inp = varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                        window_size, softcap, alibi_slopes, causal_alignment, dropout_p, return_lse)
    out, lse = _run(inp, backend)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
            window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left", return_lse=False,
            backend=None):
    """Which backend would run these arguments, and why each other one would not."""
    inp = dense_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                       softcap, alibi_slopes, causal_alignment, return_lse)
    return backends.explain_inputs(inp, backend)
