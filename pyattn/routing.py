"""pyattn.enable(): torch.nn.functional.scaled_dot_product_attention routed to pyattn's kernels, for code that
calls torch's function (torch's nn.MultiheadAttention and nn.Transformer* slow paths, Hugging Face models with
attn_implementation="sdpa", any model), with no change to that code.

enable() rebinds the name in torch.nn.functional, where torch's own modules and model code look the function up
at call time. Why not a TorchFunctionMode: it would make every other torch op pay a Python call in eager
(1-5 us each, measured on a 2-core CPU), only in the thread that entered it, and dynamo in torch 2.13 does not
trace it into compiled graphs; a rebound name costs nothing outside attention, holds in every thread, and dynamo
guards on it, so compiled code follows enable() and disable(). Code that bound torch's function to a name of its
own before enable() (`from torch.nn.functional import scaled_dot_product_attention`) keeps torch's.
"""
import contextlib

import torch
import torch.nn.functional as F

from . import backends
from .backends import TORCH_SDPA
from .errors import AttentionInputError
from .inputs import dense_inputs, dense_outputs

FUSED = ("triton", "cuda", "cpu")
# torch.nn.attention.sdpa_kernel(...) switches these off for the backends it leaves out
SDP_ENABLED = (torch._C._get_flash_sdp_enabled, torch._C._get_mem_efficient_sdp_enabled,
               torch._C._get_math_sdp_enabled, torch._C._get_cudnn_sdp_enabled,
               torch._C._get_overrideable_sdp_enabled)


def _torch_kernels_chosen():
    """Inside sdpa_kernel(...) (or with one of torch's SDPA backends switched off) the caller picked torch's kernels."""
    for sdp_enabled in SDP_ENABLED:
        if not sdp_enabled():
            return True
    return False


def _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """-> (AttnInputs, backend) when a fused pyattn backend takes the call, else (None, why it stays with torch)."""
    if _torch_kernels_chosen():
        return None, "torch.nn.attention.sdpa_kernel(...) restricts torch's SDPA backends: the caller chose torch's"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if type(t) is not torch.Tensor:  # nested, distributed and other subclasses have their own SDPA rules
            return None, f"{name} is a {type(t).__name__}, not a plain torch.Tensor"
    try:
        inp = dense_inputs(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    except AttentionInputError as e:
        return None, f"pyattn refuses the arguments: {e}"
    backend = backends.choose(inp)
    if backend.name not in FUSED:
        return None, f"no fused pyattn backend takes them (pyattn would run {backend.name!r})"
    return inp, backend


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention while pyattn is enabled: torch's signature, pyattn's fused
    kernels where one takes the call, torch's function otherwise (pyattn.explain says which and why)."""
    inp, backend = _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if inp is None:
        return TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return dense_outputs(inp, *backend.forward(inp))


def explain_route(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """One line: where a call of torch's function with these arguments goes under pyattn.enable()."""
    state = "on" if is_enabled() else "off"
    inp, backend = _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    where = f"runs pyattn's {backend.name!r} backend" if inp is not None else f"stays with torch: {backend}"
    return f"torch.nn.functional.scaled_dot_product_attention under pyattn.enable() ({state} now): {where}"


def is_enabled():
    return F.scaled_dot_product_attention is scaled_dot_product_attention


def enable():
    """Route torch.nn.functional.scaled_dot_product_attention to pyattn, in every thread, until disable()."""
    F.scaled_dot_product_attention = scaled_dot_product_attention


def disable():
    """Give torch.nn.functional.scaled_dot_product_attention back to torch."""
    F.scaled_dot_product_attention = TORCH_SDPA


@contextlib.contextmanager
def enabled():
    """enable() for a block; afterwards the function is what it was before the block."""
    before = F.scaled_dot_product_attention
    enable()
    try:
        yield
    finally:
        F.scaled_dot_product_attention = before
