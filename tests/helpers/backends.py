"""Backends under test: their devices and dtypes, pytest params per backend/device, and small run helpers.

Nothing here probes a device at import time except torch.cuda.is_available() (for skip marks, and to run
the Triton kernels under the interpreter where no GPU exists: tests/helpers/__init__.py sets TRITON_INTERPRET).
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from torch.utils._python_dispatch import TorchDispatchMode

import pyattn
from pyattn import cpu_capability

TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, whatever pyattn.enable() does to the name later

# Backends under test. "cpu" and "triton" are required: `make test` always builds pyattn._C and installs
# triton, so a missing one fails. "cuda" runs where CUDA exists (skipped elsewhere).
BACKENDS = ["cpu", "triton", "reference", "cuda"]
# dtypes of the backends that do not take all four; tests whose dtype is fixed run these in their first one.
# The Triton interpreter's bf16 dot is wrong, so under it triton is tested in fp32 and fp16 only.
BACKEND_DTYPES = {"cuda": (torch.float16, torch.bfloat16),
                  "triton": (torch.float32, torch.float16) + (
                      () if os.environ["TRITON_INTERPRET"] == "1" else (torch.bfloat16,))}
FUSED = ("cpu", "triton", "cuda")


def half_dtype(backend):
    """bf16 where the backend takes it, else fp16."""
    return torch.bfloat16 if torch.bfloat16 in BACKEND_DTYPES.get(backend, (torch.bfloat16,)) else torch.float16


def backend_device(backend):
    if backend == "triton":
        return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    return "cuda" if backend == "cuda" else "cpu"


def default_dtype(backend):
    """The dtype a test without a dtype parameter runs in: float32, or the backend's first dtype."""
    return BACKEND_DTYPES.get(backend, (torch.float32,))[0]


def on_device(fn, device):
    """fn with its tensor arguments moved to device and its outputs moved back to where the first tensor argument
    was: the same CPU tensors, oracle and baseline then serve a GPU backend (the moves are differentiable)."""
    def run(*args, **kwargs):
        home = next((x.device for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)), None)
        # a CausalBias holds no data (its variant and lengths are all it says): moving it would drop them
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) and not isinstance(x, CausalBias) else x  # noqa: E731
        out = fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        back = lambda x: x.to(home) if home is not None else x  # noqa: E731
        return tuple(map(back, out)) if isinstance(out, tuple) else back(out)
    return run


def sdpa_on(backend):
    """pyattn.scaled_dot_product_attention forced to backend, run on its device, taking and giving CPU tensors."""
    return on_device(functools.partial(pyattn.scaled_dot_product_attention, backend=backend), backend_device(backend))


def lower_cpu_capabilities():
    """The compiled CPU capabilities this CPU runs below the one in use (the best, or the one PYATTN_CPU_CAPABILITY
    asks for): the CPU grid runs on each of them too, so one machine checks every kernel build it can run.
    PYATTN_TEST_ONE_CPU_CAPABILITY=1 (make test-quick) runs it on the one in use only."""
    current = cpu_capability.current()
    if current is None or os.environ.get("PYATTN_TEST_ONE_CPU_CAPABILITY") == "1":
        return []
    names = cpu_capability.order()
    return [n for n in names[:names.index(current)] if n in cpu_capability.compiled() and cpu_capability.cpu_supports(n)]


def backend_params(backends=None, fused_only=False, lower_capabilities=True):
    """pytest.param(backend, device) for each backend under test; CUDA ones skip where CUDA is absent. "cpu" comes
    once per CPU capability: id "cpu" on the one in use, and (lower_capabilities) "cpu-<capability>" on each lower
    one; tests whose cost is not in the kernel (gradcheck in float64, compile) run on the one in use only."""
    params = []
    for name in backends or BACKENDS:
        if fused_only and name not in FUSED:
            continue
        device = backend_device(name)
        marks = []
        if device == "cuda":
            marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"))
        params.append(pytest.param(name, device, id=name, marks=marks))
        if name == "cpu" and lower_capabilities:
            params += [pytest.param(name, device, id=f"cpu-{cap}", marks=[pytest.mark.cpu_capability(cap)])
                       for cap in lower_cpu_capabilities()]
    return params


class PyattnOps(TorchDispatchMode):
    """Counts the pyattn ops (kernels) dispatched while it is active (eager only: dynamo refuses dispatch modes)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "pyattn"
        return func(*args, **(kwargs or {}))


def device_params():
    """pytest.param(device) for "cpu" and "cuda"; the CUDA one skips where CUDA is absent."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="CUDA is not available"))]
