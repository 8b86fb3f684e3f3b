"""torch's own words for a call pyattn refuses: what torch's scaled_dot_product_attention raises for the same
arguments, so that code matching torch's messages (torch's own test suite among it) finds them in pyattn's errors.

torch is asked, never imitated: its function runs on meta tensors of the same sizes, dtypes and strides, which
validate and compute nothing. That is also what torch raises under torch.compile, whose fake tensors take the meta
path; in eager, a few of torch's kernels skip a check (the CPU kernel takes a mask with is_causal=True) or raise
it later in other words (a mask that does not broadcast fails in the addition to the scores). Only q, k and v on
different devices need the real tensors: torch checks that first, before it computes anything. Asked only on
the error path, so it costs a valid call nothing.
"""
import warnings

import torch

_TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention  # torch's, even while pyattn.enable() is on


def _meta(t):
    if type(t) is not torch.Tensor:  # a CausalBias raises its own words before it is read; non-tensors as given
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _devices_differ(query, key, value):
    tensors = (query, key, value)
    return all(isinstance(t, torch.Tensor) for t in tensors) and len({t.device for t in tensors}) > 1


def sdpa_refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The message torch's scaled_dot_product_attention raises for these arguments, or None if it takes them."""
    if torch.compiler.is_compiling():
        return None
    args = (query, key, value, attn_mask)
    if not _devices_differ(query, key, value):
        args = tuple(_meta(t) for t in args)
    try:
        _TORCH_SDPA(*args[:3], attn_mask=args[3], dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    except (RuntimeError, TypeError, ValueError) as e:
        return str(e)
    return None


def with_torch_words(error, words):
    """error (a pyattn error) with torch's words in front, as the same class: -> the error to raise."""
    if words is None or words in str(error):
        return error
    return type(error)(f"{words} (pyattn: {error})")


# a kernel option torch's flex_attention refuses only after every argument check: its refusal of it means "accepted"
_FLEX_ACCEPTED = "OUTPUT_LOGSUMEXP must not be in kernel_options"


def flex_refusal(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options, return_aux):
    """The message torch's flex_attention raises for these arguments, or None if it takes them. torch checks them all
    before it computes anything, and then refuses an internal kernel option: asked with that option, it never
    computes. q, k, v go detached (torch's CPU flex_attention refuses gradients, which is its limit, not the call's)."""
    if torch.compiler.is_compiling():
        return None
    from torch.nn.attention.flex_attention import flex_attention
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in (query, key, value)]
    options = {**(kernel_options if isinstance(kernel_options, dict) else {}), "OUTPUT_LOGSUMEXP": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(*detached, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                           return_lse=return_lse, kernel_options=options, return_aux=return_aux)
    except AssertionError as e:
        return None if str(e) == _FLEX_ACCEPTED else str(e)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as e:
        return str(e)
    return None
