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


# read once: backend checks run inside torch.compile'd code, and Dynamo cannot trace into the pybind call
COMPILED_BACKENDS = tuple(build_info()["backends"])


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
                                              inp.cu_seqlens_k, *_options(inp), rng_state, inp.sinks)


def fused_backward(inp: AttnInputs, dout, out, lse, dlse, rng_state, op_name="bwd"):
    """Gradients of fused_forward(inp) for dout (B, Hq, L, Ev) given its out and lse (and dlse (B, Hq, L) or
    None), without a mask gradient: -> dq, dk, dv like inp.q, inp.k, inp.v."""
    dq, dk, dv, _ = getattr(torch.ops.pyattn, op_name)(
        dout, inp.q, inp.k, inp.v, out, lse, dlse, inp.mask, inp.alibi_slopes, inp.cu_seqlens_q, inp.cu_seqlens_k,
        *_options(inp), rng_state, False, inp.sinks)
    return dq, dk, dv


def kvcache_forward(inp, op_name="kvcache_fwd"):
    """kvcache_fwd (csrc/ops.cpp) for a KVCacheInputs: -> out (B, L, Hq, Ev), lse (B, Hq, L) float32."""
    return getattr(torch.ops.pyattn, op_name)(
        inp.q, inp.k_cache, inp.v_cache, inp.seqlens_k, inp.block_table, inp.cache_batch_idx, inp.cache_leftpad,
        inp.alibi_slopes, inp.sinks, inp.scale, inp.window_left, inp.window_right, inp.softcap)


def kvcache_fake(q, k_cache, v_cache, *args):
    B, L, Hq, _ = q.shape
    return q.new_empty(B, L, Hq, v_cache.shape[-1]), q.new_empty(B, Hq, L, dtype=torch.float32)


def _fwd_fake(q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *options_rng_state_sinks):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, dlse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
              max_seqlen_k, scale, window_left, window_right, bottom_right, softcap, dropout_p, rng_state, mask_grad,
              sinks=None):
    dmask = q.new_empty(mask.shape if mask_grad else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


N_OPTIONS = 8  # the schema's scalars between cu_seqlens_k and rng_state (csrc/ops.cpp)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k = inputs[:7]
    options, (rng_state, *sinks) = inputs[7:7 + N_OPTIONS], inputs[7 + N_OPTIONS:]
    sinks = sinks[0] if sinks else None  # a default the caller left out
    out, lse = output
    ctx.options = options
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[3]
    ctx.sinks_grad = sinks is not None and ctx.needs_input_grad[8 + N_OPTIONS]
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng_state, sinks)


def sinks_grad(sinks, out, lse, dout, dlse):
    """d loss / d sinks (Hq,) for out (B, Hq, L, Ev) and lse (B, Hq, L) computed with the sinks: a sink's softmax
    weight in row i is p_i = exp(sink - lse_i), and d lse_i / d sink = p_i, d out_i / d sink = -p_i out_i."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    p = torch.exp(sinks.to(acc)[:, None] - lse.to(acc))
    p = p.masked_fill(lse == float("-inf"), 0)  # varlen rows of no sequence
    dp = -(dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        dp = dp + dlse.to(acc)
    return (p * dp).sum(dim=(0, 2)).to(sinks.dtype)


def register_attention_op(fwd_name, bwd_name):
    """Fake impls and autograd for a (fwd, bwd) pair with the schemas of csrc/ops.cpp: every backend's ops
    share them, so they differentiate the same way."""
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_fake(bwd_name)(_bwd_fake)
    bwd_op = getattr(torch.ops.pyattn, bwd_name.split("::")[1])

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng_state, sinks = ctx.saved_tensors
        dq, dk, dv, dmask = bwd_op(dout, q, k, v, out, lse, dlse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                   *ctx.options, rng_state, ctx.mask_grad, sinks)
        dmask = dmask.to(mask.dtype) if ctx.mask_grad else None
        dsinks = sinks_grad(sinks, out, lse, dout, dlse) if ctx.sinks_grad else None
        return ((dq, dk, dv, dmask) + (None,) * (4 + len(ctx.options)) + (dsinks,))[:ctx.n_inputs]

    torch.library.register_autograd(fwd_name, backward, setup_context=_fwd_setup_context)


if _C is not None:
    register_attention_op("pyattn::fwd", "pyattn::bwd")
    torch.library.register_fake("pyattn::kvcache_fwd")(kvcache_fake)

    @torch.library.register_fake("pyattn::cpu_dropout_mask")
    def _dropout_mask_fake(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, offset):
        return torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
