"""torch.library glue: loading the compiled ops and defining the Triton ones, their fake (meta) impls and autograd, and
the call helpers.

Schemas live in csrc/ops.cpp (their arguments as Python reads them: op_args.py); kernels register per device in
csrc/cpu and csrc/cuda; the Triton ops (triton_ops.py), which take the compiled ops' schemas and host checks, are
defined at the end of this file.
"""
import importlib.util

import torch

from . import graph_backward, op_args
from .inputs import AttnInputs
from .op_args import pick

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
    op, args = getattr(torch.ops.pyattn, op_name), pick(op_args.FwdArgs, inp, rng_state=rng_state)
    if needs_autograd(inp):
        return op(*args)
    # Nothing to differentiate: straight to the kernel. torch.library's autograd kernel would find the same, but only
    # after a round trip through Python with every argument boxed twice: about 3/4 of a tiny call's time (B=1, H=8,
    # L=S=16, D=64 fp32 on the CPU: 106 -> 29 us under load).
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def needs_autograd(inp: AttnInputs):
    """Whether autograd must see this call: grad mode on with an input that requires grad, or a graph being traced
    (torch.compile decides there)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (inp.q, inp.k, inp.v, inp.mask, inp.alibi_slopes, inp.sinks))


def fused_backward(inp: AttnInputs, dout, out, lse, dlse, rng_state, op_name="bwd"):
    """Gradients of fused_forward(inp) for dout (B, Hq, L, Ev) given its out and lse (and dlse (B, Hq, L) or
    None), without a mask gradient: -> dq, dk, dv like inp.q, inp.k, inp.v."""
    dq, dk, dv, _ = getattr(torch.ops.pyattn, op_name)(*pick(
        op_args.BwdArgs, inp, dout=dout, out=out, lse=lse, dlse=dlse, rng_state=rng_state, mask_grad=False))
    return dq, dk, dv


def kvcache_args(inp):
    """kvcache_fwd's arguments for a record with a cache part: q back in its (B, L, Hq, E) layout."""
    return pick(op_args.KVCacheArgs, inp.cache, inp, q=inp.q.transpose(1, 2))


def kvcache_forward(inp, op_name="kvcache_fwd"):
    """kvcache_fwd (csrc/ops.cpp) for a record with a cache part: -> out (B, L, Hq, Ev), lse (B, Hq, L) float32."""
    return getattr(torch.ops.pyattn, op_name)(*kvcache_args(inp))


def kvcache_fake(*args):
    a = op_args.KVCacheArgs(*args)
    B, L, Hq, _ = a.q.shape
    return a.q.new_empty(B, L, Hq, a.v_cache.shape[-1]), a.q.new_empty(B, Hq, L, dtype=torch.float32)


def _fwd_fake(*args):
    a = op_args.FwdArgs(*args)
    B, Hq, L, _ = a.q.shape
    return op_args.new_out(a.q, a.v.shape[-1]), a.q.new_empty(B, Hq, L, dtype=torch.float32)


def _bwd_fake(*args):
    a = op_args.BwdArgs(*args)
    dmask = a.q.new_empty(a.mask.shape if a.mask_grad else (0,), dtype=torch.float32)
    return a.q.new_empty(a.q.shape), a.k.new_empty(a.k.shape), a.v.new_empty(a.v.shape), dmask


def _fwd_setup_context(ctx, inputs, output):
    # inputs come with their defaults filled in; needs_input_grad has one flag per argument the caller passed (trailing
    # defaults are dropped by the dispatcher) and a last one for the metadata torch's autograd wrapper appends
    args, needs_grad = op_args.FwdArgs(*inputs), op_args.FwdArgs(*ctx.needs_input_grad[:-1])
    ctx.options = pick(op_args.Options, args)
    ctx.mask_grad = args.mask is not None and args.mask.dtype != torch.bool and needs_grad.mask
    ctx.sinks_grad = args.sinks is not None and needs_grad.sinks
    ctx.save_for_backward(*output, *(getattr(args, name) for name in op_args.FWD_TENSORS))


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
        out, lse, *saved = ctx.saved_tensors
        fwd = dict(zip(op_args.FWD_TENSORS, saved))
        if graph_backward.wanted(fwd, dout):
            grads = graph_backward.backward(op_args.FwdArgs(**fwd, **ctx.options._asdict()), dout, dlse, ctx.mask_grad,
                                            ctx.sinks_grad)
        else:
            dq, dk, dv, dmask = bwd_op(*op_args.BwdArgs(dout=dout, out=out, lse=lse, dlse=dlse, mask_grad=ctx.mask_grad,
                                                        **fwd, **ctx.options._asdict()))
            grads = dict(q=dq, k=dk, v=dv)
            if ctx.mask_grad:
                grads["mask"] = dmask.to(fwd["mask"].dtype)
            if ctx.sinks_grad:
                grads["sinks"] = sinks_grad(fwd["sinks"], out, lse, dout, dlse)
        return tuple(grads.get(name) for name in op_args.FwdArgs._fields)

    torch.library.register_autograd(fwd_name, backward, setup_context=_fwd_setup_context)


if _C is not None:
    register_attention_op("pyattn::fwd", "pyattn::bwd")
    torch.library.register_fake("pyattn::kvcache_fwd")(kvcache_fake)

    @torch.library.register_fake("pyattn::cpu_dropout_mask")
    def _dropout_mask_fake(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, offset):
        return torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)

    # The Triton kernels' ops (pyattn/triton_ops.py), defined whenever pyattn._C is (they take its schemas and host
    # checks): they need torch alone until their first launch imports triton and the kernels.
    from . import triton_ops  # noqa: F401  (defines pyattn::triton_fwd / triton_bwd / triton_kvcache_fwd)
    register_attention_op("pyattn::triton_fwd", "pyattn::triton_bwd")
    torch.library.register_fake("pyattn::triton_kvcache_fwd")(kvcache_fake)


# looked up once, not imported: backend choice asks on every call
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason():
    """Why the Triton ops cannot run in this installation, or None."""
    if _C is None:
        return f"pyattn._C is not built ({_LOAD_ERROR}), and the Triton ops take their schemas and checks from it"
    return None if _TRITON_INSTALLED else "triton is not installed"
