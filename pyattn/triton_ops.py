"""The Triton kernels (pyattn.kernels) as torch.library ops pyattn::triton_fwd / triton_bwd / triton_kvcache_fwd, with
the compiled ops' schemas (pyattn/op_args.py). Opaque custom ops: torch.compile and torch.export keep them whole rather
than tracing into the launchers. pyattn/ops.py imports this when it loads (it needs triton) and gives these ops the
compiled ops' fake impls and autograd. Inputs are checked as the C++ host checks the compiled ops' (op_checks.py):
the launchers and kernels trust them."""
import contextlib

import torch

from . import op_args, op_checks
from .kernels import launch
from .op_args import BwdArgs, FwdArgs, KVCacheArgs

TAG = "pyattn triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _host(q):
    return op_checks.Host(TAG, q.device, DTYPES)


def _on_device(t):
    """Launch on t's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fwd(*args):
    """-> out (B, Hq, L, Ev), lse (B, Hq, L) float32."""
    a = FwdArgs(*args)
    op_checks.check_fwd(_host(a.q), a)
    with _on_device(a.q):
        return launch.forward(a)


def _bwd(*args):
    """-> dq, dk, dv like q, k, v; dmask (B, Hq, L, S) float32 when mask_grad, else empty."""
    a = BwdArgs(*args)
    op_checks.check_bwd(_host(a.q), a)
    with _on_device(a.q):
        return launch.backward(a)


def _kvcache_fwd(*args):
    """-> out (B, L, Hq, Ev), lse (B, Hq, L) float32. Forward only."""
    a = KVCacheArgs(*args)
    op_checks.check_kvcache(_host(a.q), a)
    with _on_device(a.q):
        return launch.kvcache_forward(a)


def _define(name, impl, decls, returns):
    return torch.library.custom_op(f"pyattn::{name}", impl, mutates_args=(), schema=op_args.schema(decls, returns))


triton_fwd = _define("triton_fwd", _fwd, op_args.FWD, op_args.FWD_RETURNS)
triton_bwd = _define("triton_bwd", _bwd, op_args.BWD, op_args.BWD_RETURNS)
triton_kvcache_fwd = _define("triton_kvcache_fwd", _kvcache_fwd, op_args.KVCACHE_FWD, op_args.KVCACHE_FWD_RETURNS)
