"""The public functions: validate -> normalize (pyattn.inputs) -> choose a backend -> run -> user shapes."""
import torch
from torch.autograd import forward_ad

from . import backends, routing
from .errors import AttentionInputError
from .inputs import dense_inputs, dense_outputs, flex_inputs, flex_outputs, varlen_inputs
from .kvcache import explain_kvcache
from .normalize import autocast
from .ops import _C

# A plainly valid CPU call straight to the kernel, else None (csrc/direct.h); the full path below is the contract.
_DIRECT = getattr(_C, "sdpa_direct", None)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window_size=None, softcap=None, alibi_slopes=None,
                                 causal_alignment="top_left", sinks=None, return_lse=False, backend=None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, plus FlashAttention's extras.
    sinks (Hq,): per-head sink logits (gpt-oss), in every row's softmax denominator, with no value.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev), and with return_lse also the
    float32 log-sum-exp (..., L) of the scores. attn_mask may also be a torch.nn.attention.bias.CausalBias, or a
    torch.nn.attention.flex_attention.BlockMask (flex_attention's block mask, as flex_attention applies it).
    See DESIGN.md's API contract. Nested (jagged) tensors go to torch's function, which has their rules; for
    packed sequences with pyattn's kernels and extras, see varlen_attention.
    """
    if attn_mask is None and backend is None and softcap is None and alibi_slopes is None and sinks is None \
            and return_lse is False and _DIRECT is not None and not torch.compiler.is_compiling() \
            and forward_ad._current_level < 0 and not torch._C._is_torch_function_mode_enabled():
        out = _DIRECT(query, key, value, dropout_p, is_causal, scale, enable_gqa, window_size, causal_alignment)
        if out is not None:
            return out
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        given = {"alibi_slopes": alibi_slopes is not None, "backend": backend not in (None, "auto"),
                 "causal_alignment": causal_alignment != "top_left", "return_lse": bool(return_lse),
                 "sinks": sinks is not None, "softcap": softcap is not None, "window_size": window_size is not None}
        if any(given.values()):
            raise AttentionInputError(f"nested (jagged) query, key or value run on torch's SDPA, which takes none of "
                                      f"{[name for name, on in given.items() if on]}; pack the sequences for "
                                      "pyattn.varlen_attention instead")
        return backends.TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                   enable_gqa=enable_gqa)
    inp = dense_inputs(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                       causal_alignment=causal_alignment, return_lse=return_lse, sinks=sinks)
    return dense_outputs(inp, *backends.choose(inp, backend).forward(inp))


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_lse=False,
                   kernel_options=None, *, return_aux=None, backend=None):
    """Drop-in for torch.nn.attention.flex_attention.flex_attention, with the meaning of torch's compiled kernel.

    query (B, Hq, L, E), key (B|1, Hkv, S, E), value (B|1, Hkv, S, Ev) -> out (B, Hq, L, Ev); with return_lse also
    lse (B, Hq, L) float32 (natural log), with return_aux=AuxRequest(lse=True) (out, AuxOutput). score_mod(score, b,
    h, q_idx, kv_idx) as torch's: pyattn.score_mods' families run fused, any other callable on the reference math.
    block_mask: torch's BlockMask (create_block_mask, from_kv_blocks), its mask_mod evaluated once per partial block.
    kernel_options: torch's tuning hints are accepted and ignored. See docs/semantics.md.
    """
    inp = flex_inputs(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
                      return_aux)
    return flex_outputs(inp, *backends.choose(inp, backend).forward(inp), return_aux)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                     scale=None, window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left",
                     dropout_p=0.0, sinks=None, return_lse=False, backend=None):
    """Packed sequences: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev) -> (total_q, Hq, Ev).

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v;
    it attends only within itself. With return_lse, also lse (Hq, total_q) float32.
    """
    q, k, v = autocast(q, k, v)
    inp = varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=is_causal,
                        scale=scale, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                        causal_alignment=causal_alignment, dropout_p=dropout_p, return_lse=return_lse, sinks=sinks)
    out, lse = backends.choose(inp, backend).forward(inp)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=None, scale=None, enable_gqa=False, *,
            window_size=None, softcap=None, alibi_slopes=None, causal_alignment="top_left", sinks=None,
            return_lse=False, backend=None, score_mod=None, block_mask=None, **kvcache):
    """Which backend would run these arguments, and why each other one would not; for torch's arguments alone,
    also where pyattn.enable() sends a call of torch's function with them. With kvcache_attention's keywords
    (cache_seqlens=...), the same for kvcache_attention(query, key, value, ...): key and value are the caches.
    is_causal=None means each function's default (False for attention, True for kvcache_attention). With score_mod
    or block_mask, the same for flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa)."""
    if score_mod is not None or block_mask is not None:
        inp = flex_inputs(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse)
        return backends.explain_inputs(inp, backend)
    if kvcache:
        if "cache_seqlens" not in kvcache:
            raise TypeError(f"explain() got unexpected keyword arguments {sorted(kvcache)}")
        extras = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                      scale=scale, return_lse=return_lse, backend=backend)
        return explain_kvcache(query, key, value, is_causal=True if is_causal is None else is_causal, **extras,
                               **kvcache)
    is_causal = False if is_causal is None else is_causal
    inp = dense_inputs(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                       causal_alignment=causal_alignment, return_lse=return_lse, sinks=sinks)
    lines = backends.explain_inputs(inp, backend)
    torch_arguments_only = window_size is None and softcap is None and alibi_slopes is None \
        and causal_alignment == "top_left" and not return_lse and sinks is None
    if torch_arguments_only:
        lines += "\n" + routing.explain_route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return lines
