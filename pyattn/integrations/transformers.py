"""Hugging Face transformers: pyattn as an attention implementation.

    import pyattn.integrations.transformers as pt
    pt.register()                                   # once; then
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="pyattn")

Two functions are registered under the name. The mask function keeps masks small: for the plain causal and
sliding-window causal patterns, with the queries ending at the last key (no cache, or a dynamic cache while
decoding or in chunked prefill), it returns only the (B, S) padding mask, or None without padding, and the
attention function applies causality (bottom-right aligned), the module's window and softcap inside the
kernel. Every other pattern (static caches, packed sequences, custom mask functions) gets transformers' own
dense (B, 1, L, S) bool mask, which the attention function applies as it is. transformers is imported only
inside these functions: `import pyattn` never needs it.
"""
import torch

from ..errors import AttentionInputError
from ..functional import scaled_dot_product_attention


def register(name="pyattn"):
    """Register pyattn's attention and mask functions with transformers under name; returns name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


def _is_band(mask_function, local_size, config):
    """Whether the mask is plain causal or sliding-window causal: the kernel computes those itself (the window
    from the attention module's sliding_window).

    Asked only of masks that transformers lets skip (allow_is_causal_skip): those come from create_causal_mask
    (causal_mask_function), create_sliding_window_causal_mask (local_size = config.sliding_window) or
    create_chunked_causal_mask (local_size = config.attention_chunk_size). The window is told apart by the
    config rather than by looking into mask_function's closure, which torch.compile cannot trace."""
    from transformers import masking_utils

    if mask_function is masking_utils.causal_mask_function:
        return local_size is None
    return local_size is not None and local_size == getattr(config, "sliding_window", None) \
        and local_size != getattr(config, "attention_chunk_size", None)


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, local_size=None, allow_is_causal_skip=True, config=None, **kwargs):
    """transformers' mask interface. attention_mask: (B, >= kv_offset + kv_length) bool padding, True = token.

    -> None or a (B, kv_length) bool padding mask where the kernel can apply the pattern itself, else the dense
    (B, 1, q_length, kv_length) bool mask (True = attend)."""
    from transformers import masking_utils

    mask_function = mask_function or masking_utils.causal_mask_function
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if allow_is_causal_skip and aligned and _is_band(mask_function, local_size, config):
        if attention_mask is None:
            return None
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length]
        # reading the values would break a compiled graph: there the all-True mask is simply applied
        if not torch.compiler.is_compiling() and bool(padding.all()):
            return None
        return padding
    kwargs.pop("allow_is_bidirectional_skip", None)  # encoders' masks pass it; a dense mask is asked for here
    return masking_utils.sdpa_mask(
        batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
        attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False, config=config, **kwargs)


# arguments of some models' attention that change its math and that pyattn's kernels do not compute
UNSUPPORTED = {"position_bias": "T5-style relative attention bias"}


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, **kwargs):
    """transformers' attention interface: query (B, Hq, L, E), key, value (B, Hkv, S, E) -> ((B, L, Hq, E), None).

    attention_mask is what attention_mask() returned (or a mask the caller prepared): None or (B, S) padding
    means causality and window come from the module and run in the kernel; a 4-D mask is applied as given.
    s_aux (Hq,): gpt-oss's per-head attention sinks, which pyattn computes as `sinks`.
    """
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise AttentionInputError(f"pyattn's transformers attention does not take {', '.join(unsupported)} "
                                  f"({', '.join(UNSUPPORTED[n] for n in unsupported)}); "
                                  "use attn_implementation='eager'")
    opts = dict(dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1], softcap=softcap,
                sinks=kwargs.get("s_aux"))
    if attention_mask is not None and attention_mask.dim() == 4:
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, **opts)
    else:
        B, S = key.shape[0], key.shape[2]
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise AttentionInputError(f"a 2-D attention_mask must be the (batch, keys) padding mask {(B, S)}, got "
                                      f"{tuple(attention_mask.shape)} (query {tuple(query.shape)}, "
                                      f"key {tuple(key.shape)})")
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        side = -1 if sliding_window is None else sliding_window - 1
        window = (side, 0 if causal else side)  # causal as the band's right side: is_causal refuses a mask beside it
        mask = None if attention_mask is None else attention_mask[:, None, None, :]  # (B, 1, 1, S) view
        out = scaled_dot_product_attention(query, key, value, attn_mask=mask, window_size=window,
                                           causal_alignment="bottom_right", **opts)
    return out.transpose(1, 2).contiguous(), None
