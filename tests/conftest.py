"""Shared test helpers: seeds, the backend parametrization, the tolerance rule, and the one sample_inputs list.

Nothing here probes a device at import time except torch.cuda.is_available() (for skip marks, and to run
the Triton kernels under the interpreter where no GPU exists).
"""
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# before triton is imported: no GPU -> the Triton kernels run on CPU tensors under the interpreter
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pyattn  # noqa: E402
from pyattn import cpu_capability  # noqa: E402

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
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        out = fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        back = lambda x: x.to(home) if home is not None else x  # noqa: E731
        return tuple(map(back, out)) if isinstance(out, tuple) else back(out)
    return run


def lower_cpu_capabilities():
    """The compiled CPU capabilities this CPU runs below the one in use (the best, or the one PYATTN_CPU_CAPABILITY
    asks for): the CPU grid runs on each of them too, so one machine checks every kernel build it can run."""
    current = cpu_capability.current()
    if current is None:
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


@pytest.fixture(autouse=True)
def _cpu_capability(request):
    """Runs a test marked cpu_capability(name) on the CPU kernels compiled for that capability."""
    mark = request.node.get_closest_marker("cpu_capability")
    if mark is None:
        yield
        return
    with cpu_capability.forced(mark.args[0]):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _backend_must_exist(request):
    """A parametrized backend whose device exists must be available: fail (never skip) when it is not built.
    Dtypes a backend declares it cannot take are skipped, saying why."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend in FUSED and backend not in pyattn.available_backends():
        from pyattn import ops
        pytest.fail(f"backend {backend!r} is required but not available (build pyattn._C: `make build`): "
                    f"{ops.load_error()}", pytrace=False)
    dtype = callspec.params.get("dtype") if callspec else None
    if isinstance(dtype, torch.dtype) and dtype not in BACKEND_DTYPES.get(backend, (dtype,)):
        why = " under the Triton interpreter" if backend == "triton" and backend_device(backend) == "cpu" else ""
        pytest.skip(f"backend {backend!r} does not take {dtype}{why}")


# ---------------------------------------------------------------------------------------------------------
# tolerance: FlashAttention's rule. Our error vs a float64 oracle is at most FACTOR x the error of plain
# PyTorch in the same dtype, plus a small absolute term (relative to the oracle's magnitude).

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FACTOR = 2.0


def dtype_id(dtype):
    return {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def assert_close_to_oracle(name, ours, baseline, oracle, dtype, atol=None, factor=FACTOR):
    """max|ours - oracle| <= factor * max|baseline - oracle| + atol * max(1, max|oracle|)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    assert not ours.isnan().any(), f"{name}: NaN in output"
    if ours.numel() == 0:
        return
    oracle = oracle.double()
    finite = torch.isfinite(oracle)
    # non-finite entries (e.g. lse = -inf for fully masked rows) must match exactly
    assert torch.equal(torch.isfinite(ours), finite) and torch.equal(ours.double()[~finite], oracle[~finite]), \
        f"{name}: non-finite entries differ from the oracle"
    err = (ours.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0
    base = (baseline.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, oracle[finite].abs().max().item()) if finite.any() else 1.0
    tol = factor * base + (ATOL[dtype] if atol is None else atol) * scale
    assert err <= tol, (f"{name}: max error {err:.3g} vs oracle > {factor} x baseline error {base:.3g} + atol "
                        f"({tol:.3g} in all)")


def run_fwd_bwd(fn, tensors, grad_names, dtype, cotangents=None):
    """fn(**tensors) -> out or (out, lse). tensors: float ones are cast to dtype (float64 stays float64 for the
    oracle when dtype is float64), names in grad_names get requires_grad. Returns (outputs, grads, cotangents)."""
    args = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and name != "alibi_slopes":
            t = t.detach().to(dtype).requires_grad_(name in grad_names)
        args[name] = t
    outs = fn(**args)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    if cotangents is None:
        cotangents = [torch.randn(o.shape, dtype=torch.float32, device=o.device) for o in outs]
    if grad_names:
        loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
        grads = torch.autograd.grad(loss, [args[n] for n in grad_names], allow_unused=True)
        grads = [torch.zeros_like(args[n]) if g is None else g for n, g in zip(grad_names, grads)]
    else:
        grads = []
    return [o.detach() for o in outs], [g.detach() for g in grads], cotangents


def check_fwd_bwd(ours, baseline, oracle, tensors, dtype, grad_names=("q", "k", "v"), atol=None, grad_atol=None,
                  out_names=("out", "lse")):
    """Runs ours/baseline in dtype and oracle in float64 on the same values; checks outputs and grads."""
    o_out, o_grads, cot = run_fwd_bwd(oracle, tensors, grad_names, torch.float64)
    b_out, b_grads, _ = run_fwd_bwd(baseline, tensors, grad_names, dtype, cot)
    y_out, y_grads, _ = run_fwd_bwd(ours, tensors, grad_names, dtype, cot)
    assert len(y_out) == len(o_out)
    for name, y, b, o in zip(out_names, y_out, b_out, o_out):
        assert y.dtype == (torch.float32 if name == "lse" else dtype), f"{name}: dtype {y.dtype}"
        assert_close_to_oracle(name, y, b, o, dtype, atol)
    for name, y, b, o in zip(grad_names, y_grads, b_grads, o_grads):
        assert y.shape == tensors[name].shape, f"grad of {name}: shape {tuple(y.shape)}"
        a = grad_atol if grad_atol is not None else atol
        if name == "attn_mask" and dtype == torch.float64 and a is None:
            a = ATOL[torch.float32]  # the ops return dmask in float32 (csrc/ops.cpp): fp32-accurate by contract
        assert_close_to_oracle(f"grad of {name}", y, b, o, dtype, a)
    return y_out, y_grads


# ---------------------------------------------------------------------------------------------------------
# sample_inputs: one list of readable cases, reused by correctness, gradient and opcheck tests.

@dataclass(frozen=True)
class Case:
    id: str
    q: tuple  # dense (..., L, E); varlen (total_q, Hq, E)
    k: tuple
    v: tuple
    mask: Optional[tuple] = None  # mask shape
    mask_dtype: Optional[str] = None  # "bool" or "float"
    mask_grad: bool = False
    alibi: Optional[tuple] = None  # slopes shape: (H,) or (B, H)
    seqlens: Optional[tuple] = None  # varlen: ((lens_q...), (lens_k...))
    kwargs: tuple = ()  # (name, value) pairs: is_causal, scale, enable_gqa, window_size, softcap, ...

    @property
    def opts(self):
        return dict(self.kwargs)

    @property
    def varlen(self):
        return self.seqlens is not None

    @property
    def torch_ok(self):
        """torch.nn.functional.scaled_dot_product_attention takes it."""
        extras = {"window_size", "softcap", "causal_alignment", "return_lse"}
        return not self.varlen and self.alibi is None and not extras & set(self.opts)

    @property
    def grad_names(self):
        return ("q", "k", "v", "attn_mask") if self.mask_grad else ("q", "k", "v")

    def make(self, device="cpu", seed=0):
        """Float32 values (cast per dtype later) and int/bool side inputs."""
        g = torch.Generator().manual_seed(seed)
        t = {name: torch.randn(shape, generator=g).to(device) for name, shape in
             (("q", self.q), ("k", self.k), ("v", self.v))}
        if self.mask is not None:
            if self.mask_dtype == "bool":
                t["attn_mask"] = (torch.rand(self.mask, generator=g) > 0.25).to(device)
            else:
                t["attn_mask"] = torch.randn(self.mask, generator=g).to(device)
        if self.alibi is not None:
            t["alibi_slopes"] = (torch.rand(self.alibi, generator=g) * 0.5 + 0.05).to(device)
        if self.varlen:
            for name, lens in zip(("cu_seqlens_q", "cu_seqlens_k"), self.seqlens):
                t[name] = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        return t

    def call(self, backend, **t):
        """Runs the case: backend "torch" is torch's F.sdpa; else pyattn with that backend."""
        opts = self.opts
        if backend == "torch":
            assert self.torch_ok, self.id
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t.get("attn_mask"), **opts)
        if self.varlen:
            lq, lk = self.seqlens
            return pyattn.varlen_attention(t["q"], t["k"], t["v"], t["cu_seqlens_q"], t["cu_seqlens_k"],
                                           max(lq, default=0), max(lk, default=0),
                                           alibi_slopes=t.get("alibi_slopes"), backend=backend, **opts)
        return pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t.get("attn_mask"),
                                                   alibi_slopes=t.get("alibi_slopes"), backend=backend, **opts)


def _dense(id, B, Hq, Hkv, L, S, E, Ev=None, **kw):
    Ev = E if Ev is None else Ev
    kw["kwargs"] = tuple(sorted(kw.get("kwargs", {}).items()))
    return Case(id, (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev), **kw)


def _varlen(id, lens_q, lens_k, Hq, Hkv, E, Ev=None, **kw):
    Ev = E if Ev is None else Ev
    kw["kwargs"] = tuple(sorted(kw.get("kwargs", {}).items()))
    return Case(id, (sum(lens_q), Hq, E), (sum(lens_k), Hkv, E), (sum(lens_k), Hkv, Ev),
                seqlens=(tuple(lens_q), tuple(lens_k)), **kw)


CASES = [
    # plain drop-in cases (torch takes them)
    _dense("L7-S33-E16", 2, 3, 3, 7, 33, 16),
    _dense("L1-S1-E8", 1, 2, 2, 1, 1, 8),
    _dense("L65-S33-E40-Ev24", 1, 2, 2, 65, 33, 40, 24),
    _dense("causal-L33-S33", 1, 2, 2, 33, 33, 32, kwargs={"is_causal": True}),
    _dense("causal-L33-S65", 1, 2, 2, 33, 65, 16, kwargs={"is_causal": True}),
    _dense("causal-L65-S33", 1, 2, 2, 65, 33, 16, kwargs={"is_causal": True}),
    _dense("boolmask-LS-L33-S65", 2, 2, 2, 33, 65, 16, mask=(33, 65), mask_dtype="bool"),
    _dense("floatmask-B1LS-grad", 2, 3, 3, 17, 33, 16, mask=(2, 1, 17, 33), mask_dtype="float", mask_grad=True),
    _dense("scale0.3-L33-S7", 1, 2, 2, 33, 7, 64, kwargs={"scale": 0.3}),
    _dense("gqa-Hq6-Hkv2", 2, 6, 2, 17, 33, 16, kwargs={"enable_gqa": True}),
    _dense("mqa-Hq4-Hkv1-causal", 1, 4, 1, 33, 33, 16, kwargs={"enable_gqa": True, "is_causal": True}),
    # extras (no torch equivalent)
    _dense("window-8-4-L65", 1, 2, 2, 65, 65, 16, kwargs={"window_size": (8, 4)}),
    _dense("window-0-right-inf", 1, 2, 2, 33, 33, 16, kwargs={"window_size": (0, -1)}),
    _dense("bottomright-causal-L7-S33", 1, 2, 2, 7, 33, 16,
           kwargs={"is_causal": True, "causal_alignment": "bottom_right"}),
    _dense("softcap5-L33-S33", 1, 2, 2, 33, 33, 16, kwargs={"softcap": 5.0}),
    _dense("alibi-H", 1, 3, 3, 33, 33, 16, alibi=(3,)),
    _dense("alibi-BH-bottomright-causal", 2, 3, 3, 17, 33, 16, alibi=(2, 3),
           kwargs={"is_causal": True, "causal_alignment": "bottom_right"}),
    _dense("lse-causal", 1, 2, 2, 33, 65, 16, kwargs={"is_causal": True, "return_lse": True}),
    _dense("combo-window-softcap-alibi-gqa-mask", 2, 4, 2, 33, 65, 32, mask=(33, 65), mask_dtype="float",
           mask_grad=True, alibi=(4,), kwargs={"window_size": (16, 8), "softcap": 10.0, "enable_gqa": True,
                                               "causal_alignment": "bottom_right", "return_lse": True}),
    # decode-shaped (short q, GQA 8:2): the kernel's split-KV path, S > 1024 merges several key chunks
    _dense("decode-L1-S1100-gqa-floatmask", 2, 8, 2, 1, 1100, 32, mask=(2, 8, 1, 1100), mask_dtype="float",
           kwargs={"enable_gqa": True, "return_lse": True}),
    _dense("decode-L3-S777-gqa-alibi-window-br", 1, 8, 2, 3, 777, 32, alibi=(8,),
           kwargs={"window_size": (300, 0), "causal_alignment": "bottom_right", "enable_gqa": True,
                   "return_lse": True}),
    _dense("decode-L3-S300-gqa-boolmask-causalband", 1, 8, 2, 3, 300, 16, mask=(3, 300), mask_dtype="bool",
           kwargs={"window_size": (-1, 0), "enable_gqa": True}),
    # varlen
    _varlen("decode-varlen-gqa-br-lse", (1, 3, 0), (300, 1100, 5), 8, 2, 16,
            kwargs={"is_causal": True, "causal_alignment": "bottom_right", "return_lse": True}),
    _varlen("varlen-3seq-incl0", (5, 0, 33), (9, 0, 17), 2, 2, 16),
    _varlen("varlen-causal-br-gqa", (7, 33, 1), (33, 7, 5), 4, 2, 16,
            kwargs={"is_causal": True, "causal_alignment": "bottom_right"}),
    _varlen("varlen-window-alibi-lse", (17, 9), (17, 33), 2, 1, 16, alibi=(2, 2),
            kwargs={"window_size": (4, 2), "return_lse": True}),
]


def sample_inputs(dtypes=(torch.float32,), which=("torch", "extras", "varlen"), cases=None):
    """pytest.param(case, dtype) for each case of the chosen kinds and each dtype, id "<case>-<dtype>"."""
    def kind(c):
        return "varlen" if c.varlen else ("torch" if c.torch_ok else "extras")

    params = []
    for c in cases or CASES:
        if kind(c) not in which:
            continue
        for dtype in dtypes:
            params.append(pytest.param(c, dtype, id=f"{c.id}-{dtype_id(dtype)}"))
    return params


def device_params():
    """pytest.param(device) for "cpu" and "cuda"; the CUDA one skips where CUDA is absent."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="CUDA is not available"))]
