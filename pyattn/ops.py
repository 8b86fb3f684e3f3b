"""torch.library glue for the compiled ops: loading, fake (meta) impls, autograd, and the call helper.

Schemas live in csrc/ops.cpp; kernels register per device in csrc/cpu and csrc/cuda.
"""
import torch

from .inputs import AttnInputs

_LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.pyattn.*)
except ImportError as e:  # a source checkout that was never built: the reference backend still works
    _C = None
    _LOAD_ERROR = str(e)


if _C is not None:
    from . import cpu_capability
    cpu_capability.load()


def load_error():
    return _LOAD_ERROR


def has_op(name):
    return _C is not None and hasattr(torch.ops.pyattn, name)


def build_info():
    return _C.build_info() if _C is not None else {"version": None, "backends": [], "error": _LOAD_ERROR}


def _options(inp: AttnInputs):
    return (inp.max_seqlen_q, inp.max_seqlen_k, inp.scale, inp.window_left, inp.window_right, inp.bottom_right,
            inp.softcap, inp.dropout_p)


def draw_rng_state(inp: AttnInputs):
    """int64 (seed, offset) from torch's default generator of the input's device (torch.manual_seed
    reproduces it), or None without dropout. A tensor, never Python ints: no sync, and it traces."""
    if inp.dropout_p == 0:
        return None
    return torch.randint(0, 2**62, (2,), device=inp.device, dtype=torch.int64)


def fused_forward(inp: AttnInputs, op_name="fwd", rng_state=None):
    """-> out (B, Hq, L, Ev), lse (B, Hq, L) float32, differentiable in q, k, v and a float mask.
    rng_state: the dropout (seed, offset) to use; None draws one."""
    if rng_state is None:
        rng_state = draw_rng_state(inp)
    return getattr(torch.ops.pyattn, op_name)(inp.q, inp.k, inp.v, inp.mask, inp.alibi_slopes, inp.cu_seqlens_q,
                                inp.cu_seqlens_k, *_options(inp), rng_state)


def fused_backward(inp: AttnInputs, dout, out, lse, dlse, rng_state, op_name="bwd"):
    """Gradients of fused_forward(inp) for dout (B, Hq, L, Ev) given its out and lse (and dlse (B, Hq, L) or
    None), without a mask gradient: -> dq, dk, dv like inp.q, inp.k, inp.v."""
    dq, dk, dv, _ = getattr(torch.ops.pyattn, op_name)(
        dout, inp.q, inp.k, inp.v, out, lse, dlse, inp.mask, inp.alibi_slopes, inp.cu_seqlens_q, inp.cu_seqlens_k,
        *_options(inp), rng_state, False)
    return dq, dk, dv


def _fwd_fake(q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *options):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, dlse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
              max_seqlen_k, scale, window_left, window_right, bottom_right, softcap, dropout_p, rng_state, mask_grad):
    dmask = q.new_empty(mask.shape if mask_grad else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *options, rng_state = inputs
    out, lse = output
    ctx.options = options
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[3]
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng_state)


def register_attention_op(fwd_name, bwd_name):
    """Fake impls and autograd for a (fwd, bwd) pair with the schemas of csrc/ops.cpp: every backend's ops
    share them, so they differentiate the same way."""
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_fake(bwd_name)(_bwd_fake)
    bwd_op = getattr(torch.ops.pyattn, bwd_name.split("::")[1])

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
        dq, dk, dv, dmask = bwd_op(dout, q, k, v, out, lse, dlse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                   *ctx.options, rng_state, ctx.mask_grad)
        dmask = dmask.to(mask.dtype) if ctx.mask_grad else None
        return (dq, dk, dv, dmask) + (None,) * (4 + len(ctx.options))

    torch.library.register_autograd(fwd_name, backward, setup_context=_fwd_setup_context)


if _C is not None:
    register_attention_op("pyattn::fwd", "pyattn::bwd")

    @torch.library.register_fake("pyattn::cpu_dropout_mask")
    def _dropout_mask_fake(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, offset):
        return torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
