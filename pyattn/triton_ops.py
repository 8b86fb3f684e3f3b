"""The Triton kernels (pyattn.kernels) as torch.library ops pyattn::triton_fwd / triton_bwd / triton_kvcache_fwd, with
the compiled ops' schemas (csrc/ops.cpp). Opaque custom ops: torch.compile and torch.export keep them whole rather
than tracing into the launchers. pyattn/ops.py imports this once pyattn._C is loaded and gives these ops the compiled
ops' fake impls and autograd.

Every call first runs the compiled ops' host checks through pyattn._C (csrc/host_checks.cpp), so a bad call meets
the refusal the CPU and CUDA ops give, under this host's tag: the launchers and kernels trust their inputs. triton
and the kernels are imported on the first launch, not with pyattn (a slow import, and no GPU may need it).
"""
import contextlib

import torch

from . import _C, op_args

TAG = "pyattn triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _launch():
    from .kernels import launch  # triton with it: on the first launch
    return launch


def _on_device(t):
    """Launch on t's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fwd(*args):
    """-> out (B, Hq, L, Ev), lse (B, Hq, L) float32."""
    a = op_args.FwdArgs(*args)
    mask_kind = _C.check_fwd(TAG, DTYPES, *a)
    with _on_device(a.q):
        return _launch().forward(a, mask_kind)


def _bwd(*args):
    """-> dq, dk, dv like q, k, v; dmask (B, Hq, L, S) float32 when mask_grad, else empty."""
    a = op_args.BwdArgs(*args)
    mask_kind = _C.check_bwd(TAG, DTYPES, *a)
    with _on_device(a.q):
        return _launch().backward(a, mask_kind)


def _kvcache_fwd(*args):
    """-> out (B, L, Hq, Ev), lse (B, Hq, L) float32. Forward only."""
    a = op_args.KVCacheArgs(*args)
    mask_kind = _C.check_kvcache_fwd(TAG, DTYPES, *a)
    with _on_device(a.q):
        return _launch().kvcache_forward(a, mask_kind)


def _define(impl, compiled):
    """pyattn::triton_<compiled> with compiled's schema."""
    return torch.library.custom_op(f"pyattn::triton_{compiled}", impl, mutates_args=(),
                                   schema=op_args.schema_text(compiled))


triton_fwd = _define(_fwd, "fwd")
triton_bwd = _define(_bwd, "bwd")
triton_kvcache_fwd = _define(_kvcache_fwd, "kvcache_fwd")
