"""The torch.library ops and the integration around them: opcheck (schema, fake impls, autograd registration),
gradcheck in float64 through the public function, torch.compile(fullgraph=True), explain(), build info."""

import pytest
import torch

import pyattn
from helpers import CASES, attn_inputs, backend_params, fwd_args, sample_inputs
from pyattn.op_args import BwdArgs, pick

# every CPU capability for the op checks; the one in use for float64 gradcheck, compile and explain
cpu_all = pytest.mark.parametrize("backend,device", backend_params(["cpu"]))
cpu_only = pytest.mark.parametrize("backend,device", backend_params(["cpu"], lower_capabilities=False))

OPCHECK_CASES = sample_inputs(dtypes=(torch.float32,)) + sample_inputs(
    dtypes=(torch.bfloat16,), cases=[c for c in CASES if c.id in ("causal-L33-S65", "gqa-Hq6-Hkv2", "alibi-H")])


@cpu_all
@pytest.mark.parametrize("case,dtype", OPCHECK_CASES)
def test_opcheck_fwd(backend, device, case, dtype):
    t = {n: (x.to(dtype) if x.is_floating_point() and n != "alibi_slopes" else x) for n, x in case.make().items()}
    inp = attn_inputs(case, t)
    torch.library.opcheck(torch.ops.pyattn.fwd.default, fwd_args(inp, True, case.mask_grad))


@cpu_all
@pytest.mark.parametrize("case,dtype", OPCHECK_CASES)
def test_opcheck_bwd(backend, device, case, dtype):
    t = {n: (x.to(dtype) if x.is_floating_point() and n != "alibi_slopes" else x) for n, x in case.make().items()}
    inp = attn_inputs(case, t)
    args = fwd_args(inp, False)
    out, lse = torch.ops.pyattn.fwd(*args)
    dlse = torch.randn_like(lse).masked_fill(~torch.isfinite(lse), 0) if case.opts.get("return_lse") else None
    bwd = pick(BwdArgs, args, dout=torch.randn_like(out), out=out, lse=lse, dlse=dlse, mask_grad=case.mask_grad)
    dq, dk, dv, dmask = torch.ops.pyattn.bwd(*bwd)
    assert dq.shape == args.q.shape and dk.shape == args.k.shape and dv.shape == args.v.shape
    assert dmask.shape == (inp.mask.shape if case.mask_grad else (0,)) and dmask.dtype == torch.float32
    torch.library.opcheck(torch.ops.pyattn.bwd.default, bwd)


@cpu_all
def test_opcheck_with_dropout(backend, device):
    case = next(c for c in CASES if c.id == "floatmask-B1LS-grad")
    inp = attn_inputs(case, case.make(), dropout_p=0.25)
    args = fwd_args(inp, True, True, seed=123, offset=4)
    torch.library.opcheck(torch.ops.pyattn.fwd.default, args)
    a, b = torch.ops.pyattn.fwd(*args), torch.ops.pyattn.fwd(*args)
    assert torch.equal(a[0], b[0]), "same (seed, offset) must give the same output"


@cpu_all
def test_opcheck_dropout_mask(backend, device):
    torch.library.opcheck(torch.ops.pyattn.cpu_dropout_mask.default, (2, 3, 5, 7, 0.3, 1, 2))


# ----------------------------------------------------------------------------------------------------------
# gradcheck in float64 through the public function

def gradcheck(fn, *inputs, lse=False, order="grad"):
    """float64 gradcheck (order "grad") or gradgradcheck (order "gradgrad": the backward with create_graph=True,
    graph_backward); lse is float32 by contract, so with it the finite differences take a larger step."""
    tol = dict(eps=1e-3, atol=1e-3, rtol=1e-2) if lse else dict(eps=1e-6, atol=1e-5, rtol=1e-3)
    check = torch.autograd.gradcheck if order == "grad" else torch.autograd.gradgradcheck
    assert check(fn, inputs, fast_mode=False, **tol)


orders = pytest.mark.parametrize("order", ["grad", "gradgrad"])


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


GRADCHECK = [
    ("plain", dict()),
    ("causal-L!=S", dict(is_causal=True)),
    ("bottom_right", dict(is_causal=True, causal_alignment="bottom_right")),
    ("scale", dict(scale=0.7)),
    ("softcap", dict(softcap=1.5)),
    ("alibi", dict(alibi=True)),
    ("window", dict(window_size=(2, 1))),
    ("gqa", dict(enable_gqa=True)),
    ("bool-mask", dict(mask="bool")),
    ("float-mask-grad", dict(mask="float")),
    ("lse", dict(return_lse=True, is_causal=True)),
    ("dropout-seeded", dict(dropout_p=0.3)),
    ("sinks", dict(sinks=True)),
]


@cpu_only
@orders
@pytest.mark.parametrize("kw", [pytest.param(kw, id=i) for i, kw in GRADCHECK])
def test_gradcheck(backend, device, kw, order):
    kw = dict(kw)
    hkv = 1 if kw.get("enable_gqa") else 2
    q, k, v = rand(1, 2, 5, 8), rand(1, hkv, 7, 8), rand(1, hkv, 7, 6)
    inputs = [q, k, v]
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(5, 7) > 0.3
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(2)
    dropout = kw.get("dropout_p", 0.0)

    sinks = kw.pop("sinks", False)

    def fn(q, k, v, *extra):
        if dropout:
            torch.manual_seed(0)  # the same mask on every call
        named = dict(zip(["attn_mask"] * (mask == "float") + ["sinks"] * sinks, extra))
        return pyattn.scaled_dot_product_attention(q, k, v, **named, **kw, backend=backend)

    if mask == "float":
        inputs.append(rand(1, 2, 5, 7))
    if sinks:
        inputs.append(rand(2))
    gradcheck(fn, *inputs, lse=kw.get("return_lse", False), order=order)


@cpu_only
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True, causal_alignment="bottom_right", return_lse=True),
                                dict(window_size=(1, 2), softcap=2.0)], ids=["plain", "causal-br-lse", "window"])
@orders
def test_gradcheck_varlen(backend, device, kw, order):
    # lengths q (2, 0, 5), k (3, 1, 5): every query row sees a key (lse finite, so finite differences work)
    q, k, v = rand(7, 2, 4), rand(9, 1, 4), rand(9, 1, 3)
    cu_q, cu_k = torch.tensor([0, 2, 2, 7], dtype=torch.int32), torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    slopes = torch.rand(3, 2)

    def fn(q, k, v):
        return pyattn.varlen_attention(q, k, v, cu_q, cu_k, 5, 5, alibi_slopes=slopes, backend=backend, **kw)

    gradcheck(fn, q, k, v, lse=kw.get("return_lse", False), order=order)



@cpu_only
def test_create_graph_with_varlen_dropout_raises(backend, device):
    # the varlen keep-mask cannot be drawn again in differentiable form: a clear error, never zero second derivatives
    q, k, v = rand(7, 2, 4), rand(9, 1, 4), rand(9, 1, 3)
    cu_q, cu_k = torch.tensor([0, 2, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    out = pyattn.varlen_attention(q, k, v, cu_q, cu_k, 5, 5, dropout_p=0.2, backend=backend)
    with pytest.raises(pyattn.AttentionInputError, match="create_graph=True and dropout_p=0.2"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


TRANSFORMS = {
    "grad": lambda fn, q, k, v: torch.func.grad(lambda q: fn(q, k, v).sum())(q),
    "jacrev": lambda fn, q, k, v: torch.func.jacrev(lambda q: fn(q, k, v))(q),
    "vmap-grad": lambda fn, q, k, v: torch.func.vmap(torch.func.grad(lambda q: fn(q[None], k, v).sum()))(q),
    "vmap": lambda fn, q, k, v: torch.func.vmap(lambda q: fn(q, k, v))(q),
    # forward mode: torch's SDPA kernels have no forward derivatives either, so auto takes the reference math
    "jvp": lambda fn, q, k, v: torch.func.jvp(lambda q, k: fn(q, k, v), (q, k), (q.cos(), k.sin()))[1],
    "jacfwd": lambda fn, q, k, v: torch.func.jacfwd(lambda q: fn(q, k, v))(q),
    "hessian": lambda fn, q, k, v: torch.func.hessian(lambda q: fn(q, k, v).sin().sum())(q),
    "dual": lambda fn, q, k, v: _dual_tangent(fn, q, k, v),
}


def _dual_tangent(fn, q, k, v):
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(v, v.cos())
        return torch.autograd.forward_ad.unpack_dual(fn(q, k, dual)).tangent


def test_forward_mode_ad_matches_finite_differences():
    """jvp through auto's choice (the reference math) against central differences, GQA, causal, sinks."""
    q, k, v = torch.randn(1, 4, 6, 8, dtype=torch.float64), *torch.randn(2, 1, 2, 9, 8, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64)
    dq, dk, dv, ds = q.cos(), k.sin(), v.tanh(), sinks.cos()
    fn = lambda q, k, v, s: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,  # noqa: E731
                                                                 sinks=s)
    _, tangent = torch.func.jvp(fn, (q, k, v, sinks), (dq, dk, dv, ds))
    eps = 1e-6
    diff = (fn(q + eps * dq, k + eps * dk, v + eps * dv, sinks + eps * ds) -
            fn(q - eps * dq, k - eps * dk, v - eps * dv, sinks - eps * ds)) / (2 * eps)
    torch.testing.assert_close(tangent, diff, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(sinks="yes")], ids=["plain", "causal", "sinks"])
def test_torch_func_transforms(transform, kw):
    # torch.library ops have no functorch rules: auto steps aside for torch's SDPA or the reference math
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    kw = {**kw, "sinks": torch.randn(3, dtype=torch.float64)} if "sinks" in kw else kw
    run = TRANSFORMS[transform]
    got = run(lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, **kw), q, k, v)
    want = run(lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, **kw, backend="reference"), q, k, v)
    torch.testing.assert_close(got, want)
    with pytest.raises(pyattn.AttentionInputError, match="torch.func transforms|forward-mode AD"):
        run(lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, **kw, backend="cpu"), q, k, v)

# ----------------------------------------------------------------------------------------------------------
# torch.compile

def compare_compiled(fn, inputs, compile_backend):
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    eager_in = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    comp_in = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    eager, comp = fn(*eager_in), compiled(*comp_in)
    eager, comp = (eager if isinstance(eager, tuple) else (eager,)), (comp if isinstance(comp, tuple) else (comp,))
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    cot = [torch.randn_like(e) for e in eager]
    g_e = torch.autograd.grad(sum((e * c).sum() for e, c in zip(eager, cot)), [x for x in eager_in if x.requires_grad])
    g_c = torch.autograd.grad(sum((e * c).sum() for e, c in zip(comp, cot)), [x for x in comp_in if x.requires_grad])
    for e, c in zip(g_e, g_c):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


@cpu_only
@pytest.mark.compiles
def test_compile_inductor_dense(backend, device):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 33, 16, requires_grad=True), torch.randn(2, 2, 40, 16, requires_grad=True),
               torch.randn(2, 2, 40, 16, requires_grad=True))
    mask = torch.randn(2, 1, 33, 40, requires_grad=True)

    def fn(q, k, v, mask):
        return pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, window_size=(-1, 0), enable_gqa=True,
                                                   backend=backend) * 2

    compare_compiled(fn, [q, k, v, mask], "inductor")


@cpu_only
def test_compile_extras_and_lse(backend, device):
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2)

    def fn(q, k, v):
        return pyattn.scaled_dot_product_attention(q, k, v, window_size=(4, 2), softcap=5.0, alibi_slopes=slopes,
                                                   causal_alignment="bottom_right", return_lse=True, backend=backend)

    compare_compiled(fn, [q, k, v], "aot_eager")


@cpu_only
def test_compile_varlen(backend, device):
    torch._dynamo.reset()
    q, k, v = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)

    def fn(q, k, v):
        return pyattn.varlen_attention(q, k, v, cu, cu, 13, 13, is_causal=True, backend=backend)

    compare_compiled(fn, [q, k, v], "aot_eager")


@cpu_only
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.compiles)])
def test_compile_dropout(backend, device, compiler):
    """The dropout seed is drawn as a tensor, so fullgraph tracing works; same seed -> same result, and the
    backward regenerates the forward's mask (checked against eager with that mask: dropped grads are 0)."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        outs.append((out.detach(), grads))
    assert torch.equal(outs[0][0], outs[1][0]) and all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    no_dropout = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    assert not torch.allclose(outs[0][0], no_dropout)
    torch.manual_seed(4)
    assert not torch.equal(compiled(q, k, v), outs[0][0])


# ----------------------------------------------------------------------------------------------------------
# explain, available_backends, build_info

@cpu_only
def test_explain_names_the_chosen_backend(backend, device):
    q = torch.randn(1, 2, 9, 16)
    text = pyattn.explain(q, q, q, is_causal=True)
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.startswith("  ")}
    assert "chosen" in lines["cpu"], text
    assert "chosen" not in lines["reference"], text
    text = pyattn.explain(q, q, q, window_size=(2, 2), backend="reference")
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.startswith("  ")}
    assert "chosen" in lines["reference"], text
    assert "cannot" in lines["torch"] and "sliding window" in lines["torch"], text


def test_explain_gives_reasons_for_refusals():
    q = torch.randn(1, 2, 9, 16, device="meta")
    text = pyattn.explain(q, q, q, softcap=2.0)
    assert "cpu" in text and "not meta" in text, text
    assert "softcap" in text, text
    assert "reference" in text
    for name in ("triton", "cuda"):
        if name not in pyattn.available_backends():
            assert f"{name}" in text and "not part of this build" in text, text


@cpu_only
def test_explain_falls_back_with_dropout_one(backend, device):
    q = torch.randn(1, 2, 9, 16)
    text = pyattn.explain(q, q, q, dropout_p=1.0)
    assert "dropout_p == 1" in text and "'torch' runs them" in text, text


@cpu_only
def test_available_backends(backend, device):
    names = pyattn.available_backends()
    assert "cpu" in names and "reference" in names, names


@cpu_only
def test_build_info(backend, device):
    info = pyattn.build_info()
    assert info["version"] == pyattn.__version__
    assert "cpu" in info["backends"]
    assert info["torch"] == torch.__version__
    if torch.cuda.is_available():
        assert "cuda" in info["backends"], info


@cpu_only
def test_auto_prefers_the_fused_kernel(backend, device):
    """auto on CPU runs the fused kernel for what it supports: same result as forcing it, bit for bit."""
    q, k, v = torch.randn(1, 2, 33, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    auto = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=3.0)
    forced = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=3.0, backend=backend)
    assert torch.equal(auto, forced)


