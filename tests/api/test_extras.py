"""The extras (window, bottom_right, softcap, alibi, return_lse, varlen) against the float64 reference backend.

The reference itself is first checked against explicit float64 math written here (test_reference_*), so the
oracle is not trusted blindly; the fused backends are then compared with it, forward and backward.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import pyattn
from helpers import (CASES, backend_device, backend_params, check_fwd_bwd, default_dtype, dtype_id, half_dtype,
                     on_device, qkv, sample_inputs, sdpa_on)

fused = pytest.mark.parametrize("backend,device", backend_params(fused_only=True))


def attn(backend, q, k, v, attn_mask=None, alibi_slopes=None, **kw):
    """pyattn with this backend, run on the backend's device; results come back to the inputs' device."""
    return sdpa_on(backend)(q, k, v, attn_mask=attn_mask, alibi_slopes=alibi_slopes, **kw)


def check(backend, tensors, dtype=None, grad_names=("q", "k", "v"), fn=attn, **kw):
    """fn(backend, **tensors): ours vs the reference in float64, baseline = the reference in dtype (None: the
    backend's default)."""
    dtype = dtype or default_dtype(backend)
    out_names = kw.pop("out_names", ("out", "lse"))
    return check_fwd_bwd(lambda **t: fn(backend, **t, **kw), lambda **t: fn("reference", **t, **kw),
                         lambda **t: fn("reference", **t, **kw), tensors, dtype, grad_names, out_names=out_names)


# ----------------------------------------------------------------------------------------------------------
# the oracle, checked against explicit math

def explicit(q, k, v, attn_mask=None, alibi_slopes=None, is_causal=False, scale=None, enable_gqa=False,
             window_size=None, softcap=None, causal_alignment="top_left", return_lse=False):
    """Attention written out from DESIGN.md's definitions, float64, 4-D (B, H, L, E) inputs."""
    q, k, v = q.double(), k.double(), v.double()
    if enable_gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    L, S = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L)[:, None] + (S - L if causal_alignment == "bottom_right" else 0)
    j = torch.arange(S)[None, :]
    left, right = window_size or (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    allowed = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().expand(*q.shape[:-2])
        s = s - slopes[..., None, None] * (i - j).abs()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.double()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # fully masked rows: 0
    out = p @ v
    return (out, lse) if return_lse else out


EXTRAS = [c for c in CASES if not c.torch_ok and not c.varlen]


@pytest.mark.parametrize("case", EXTRAS, ids=lambda c: c.id)
def test_reference_matches_explicit_math(case):
    t = {n: (x.double() if x.is_floating_point() and n != "alibi_slopes" else x) for n, x in case.make().items()}
    ref = case.call("reference", **t)
    exp = explicit(**t, **case.opts)
    for r, e in zip(ref if isinstance(ref, tuple) else (ref,), exp if isinstance(exp, tuple) else (exp,)):
        torch.testing.assert_close(r.double(), e, atol=1e-6 if r.dtype == torch.float32 else 1e-10, rtol=1e-6)


def test_reference_varlen_matches_explicit_math():
    # lengths q (5, 0, 9, 3), k (7, 4, 9, 0)
    q, k, v = torch.randn(17, 4, 16).double(), torch.randn(20, 2, 16).double(), torch.randn(20, 2, 8).double()
    cq = torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32)
    ck = torch.tensor([0, 7, 11, 20, 20], dtype=torch.int32)
    slopes = torch.rand(4, 4)
    kw = dict(is_causal=True, causal_alignment="bottom_right", softcap=3.0, window_size=(3, -1))
    out = pyattn.varlen_attention(q, k, v, cq, ck, 9, 9, alibi_slopes=slopes, backend="reference", **kw)
    for b in range(4):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        exp = explicit(q[sq].transpose(0, 1), k[sk].transpose(0, 1), v[sk].transpose(0, 1), alibi_slopes=slopes[b],
                       enable_gqa=True, **kw).transpose(0, 1)
        torch.testing.assert_close(out[sq], exp, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# fused backends vs the float64 reference

@fused
@pytest.mark.parametrize("case,dtype", sample_inputs(dtypes=(torch.float32, torch.bfloat16), which=("extras",)))
def test_sample_inputs(backend, device, case, dtype):
    t = case.make(device)
    check_fwd_bwd(functools.partial(case.call, backend), functools.partial(case.call, "reference"),
                  functools.partial(case.call, "reference"), t, dtype, case.grad_names)


WINDOWS = [(8, 4), (0, 0), (-1, 3), (5, -1), (0, -1), (-1, 0), (40, 40), (1, 70)]


@fused
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(33, 33), (17, 65), (65, 17)], ids=lambda x: str(x))
def test_window(backend, device, window, align, L, S):
    check(backend, qkv((1, 2, L, 16), (1, 2, S, 16), (1, 2, S, 16)), window_size=window, causal_alignment=align)


@fused
def test_window_special_values(backend, device):
    """(-1, -1) is no window; (-1, 0) is causal; is_causal caps the right side at 0. In the backend's own dtype
    (cuda takes no float32); assert_close's defaults for that dtype, tighter for float32."""
    dtype = default_dtype(backend)
    t = {n: x.to(dtype) for n, x in qkv((1, 2, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16)).items()}
    f = functools.partial(attn, backend, **t)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(f(window_size=(-1, -1)), f(), **tol)
    torch.testing.assert_close(f(window_size=(-1, 0)), f(is_causal=True), **tol)
    torch.testing.assert_close(f(window_size=(8, 4), is_causal=True), f(window_size=(8, 0)), **tol)


@fused
@pytest.mark.parametrize("L,S", [(7, 33), (33, 7), (1, 65), (65, 1), (33, 33)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_causal_bottom_right(backend, device, L, S, dtype):
    t = qkv((2, 2, L, 16), (2, 2, S, 16), (2, 2, S, 16))
    (out,), grads = check(backend, t, dtype, is_causal=True, causal_alignment="bottom_right")
    if L > S:  # the first L - S queries see no key: zero output and zero grad
        assert torch.all(out[:, :, :L - S] == 0)
        assert torch.all(grads[0][:, :, :L - S] == 0)
    if L == S:  # same as top-left
        top = attn(backend, **{n: x.to(dtype) for n, x in t.items()}, is_causal=True)
        torch.testing.assert_close(out, top, atol=0, rtol=0)


@fused
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_softcap(backend, device, softcap, dtype):
    t = qkv((2, 2, 33, 32), (2, 2, 65, 32), (2, 2, 65, 32))
    t["q"] = t["q"] * 4  # large scores, so the cap bites
    check(backend, t, dtype, softcap=softcap, is_causal=softcap == 5.0)


@fused
@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 3)], ids=lambda s: "alibi" + "x".join(map(str, s)))
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(backend, device, shape, align, causal):
    t = qkv((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 16))
    t["alibi_slopes"] = torch.rand(shape) + 0.1
    check(backend, t, is_causal=causal, causal_alignment=align)


@fused
def test_alibi_with_gqa_and_3d(backend, device):
    t = qkv((4, 17, 16), (2, 33, 16), (2, 33, 16))
    t["alibi_slopes"] = torch.rand(4)
    check(backend, t, enable_gqa=True, is_causal=True)


@fused
@pytest.mark.parametrize("shapes", [
    pytest.param(((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 8)), id="4d"),
    pytest.param(((17, 16), (33, 16), (33, 16)), id="2d"),
    pytest.param(((2, 2, 4, 9, 16), (2, 2, 2, 33, 16), (2, 2, 2, 33, 16)), id="5d-gqa"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_return_lse(backend, device, shapes, dtype):
    t = qkv(*shapes)
    gqa = len(shapes[0]) == 5
    out, lse = attn(backend, **{n: x.to(dtype) for n, x in t.items()}, return_lse=True, enable_gqa=gqa)
    assert lse.dtype == torch.float32 and lse.shape == shapes[0][:-1], lse.shape
    # natural log of the row sum of exp(scale * q.k), from explicit float64 math
    _, exp_lse = explicit(**{n: x.to(dtype) for n, x in t.items()}, enable_gqa=gqa, return_lse=True)
    torch.testing.assert_close(lse.double(), exp_lse, atol=1e-4 if dtype == torch.float32 else 3e-2, rtol=0)
    # value and gradient, out and lse together
    check(backend, t, dtype, return_lse=True, enable_gqa=gqa)


@fused
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window_size": (4, 4), "softcap": 2.0}], ids=str)
def test_grad_through_lse_only(backend, device, kw):
    t = qkv((2, 2, 17, 16), (2, 2, 33, 16), (2, 2, 33, 16))

    def lse_only(backend, **a):
        return attn(backend, **a, return_lse=True)[1]

    _, (dq, dk, dv) = check(backend, t, fn=lse_only, out_names=("lse",), **kw)
    assert dq.abs().max() > 0 and dk.abs().max() > 0, "lse must carry a gradient to q and k"
    assert torch.all(dv == 0), "lse does not depend on v"


@pytest.mark.parametrize("backend,device", backend_params())
def test_lse_of_fully_masked_rows(backend, device):
    """lse is -inf where a row sees no key; out is 0 there and gradients stay finite, even through lse."""
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=default_dtype(backend), requires_grad=True) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[4] = False
    out, lse = attn(backend, q, k, v, attn_mask=mask, return_lse=True)
    assert torch.all(lse[:, :, 4] == float("-inf")) and torch.isfinite(lse[:, :, :4]).all()
    assert torch.all(out[:, :, 4] == 0)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(x.grad).all(), f"non-finite grad of {name}"
    assert torch.all(q.grad[:, :, 4] == 0)


# ----------------------------------------------------------------------------------------------------------
# varlen

def varlen(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, lens=None, alibi_slopes=None, **kw):
    return on_device(pyattn.varlen_attention, backend_device(backend))(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max(lens[0]), max(lens[1]), alibi_slopes=alibi_slopes, backend=backend,
        **kw)


# same-backend comparisons: float32 to rounding, fp16/bf16 (backends without float32) to their precision
TIGHT, LOOSE = {"atol": 2e-6, "rtol": 1e-5}, {"atol": 2e-2, "rtol": 2e-2}


def low_precision(t, backend):
    """t's q, k, v in the backend's default dtype (float32 unless it lacks it)."""
    return {n: x.to(default_dtype(backend)) if n in ("q", "k", "v") else x for n, x in t.items()}


def packed(lens_q, lens_k, hq, hkv, e, ev=None):
    t = qkv((sum(lens_q), hq, e), (sum(lens_k), hkv, e), (sum(lens_k), hkv, ev or e))
    t["cu_seqlens_q"] = torch.tensor([0, *lens_q]).cumsum(0).to(torch.int32)
    t["cu_seqlens_k"] = torch.tensor([0, *lens_k]).cumsum(0).to(torch.int32)
    return t


VARLEN_OPTS = [
    pytest.param({}, id="plain"),
    pytest.param({"is_causal": True}, id="causal"),
    pytest.param({"is_causal": True, "causal_alignment": "bottom_right"}, id="causal-bottom_right"),
    pytest.param({"window_size": (3, 5)}, id="window"),
    pytest.param({"window_size": (4, 0), "causal_alignment": "bottom_right", "softcap": 3.0}, id="window-br-softcap"),
    pytest.param({"return_lse": True, "is_causal": True}, id="lse-causal"),
]
VARLEN_LENS = [
    pytest.param(((5, 0, 33, 1), (9, 0, 17, 40)), id="4seq-with-empty"),
    pytest.param(((33, 7), (7, 33)), id="2seq-L!=S"),
    pytest.param(((0,), (5,)), id="only-empty-q"),
]


@fused
@pytest.mark.parametrize("lens", VARLEN_LENS)
@pytest.mark.parametrize("kw", VARLEN_OPTS)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_varlen(backend, device, lens, kw, heads):
    t = packed(*lens, *heads, 16)
    check(backend, t, fn=functools.partial(varlen, lens=lens), **kw)


@fused
@pytest.mark.parametrize("kw", VARLEN_OPTS)
def test_varlen_matches_dense_per_sequence(backend, device, kw):
    """Every sequence of a varlen call equals a dense call on its own slice (same backend)."""
    lens = ((5, 0, 33, 9), (9, 3, 17, 9))
    t = low_precision(packed(*lens, 4, 2, 16, 8), backend)
    t["alibi_slopes"] = torch.rand(4, 4)
    tol = TIGHT if t["q"].dtype == torch.float32 else LOOSE
    res = varlen(backend, **t, lens=lens, **kw)
    out, lse = res if kw.get("return_lse") else (res, None)
    cq, ck = t["cu_seqlens_q"].tolist(), t["cu_seqlens_k"].tolist()
    for b in range(4):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if cq[b + 1] == cq[b]:
            continue
        dense = attn(backend, t["q"][sq].transpose(0, 1), t["k"][sk].transpose(0, 1), t["v"][sk].transpose(0, 1),
                     alibi_slopes=t["alibi_slopes"][b], enable_gqa=True, **kw)
        d_out, d_lse = dense if kw.get("return_lse") else (dense, None)
        torch.testing.assert_close(out[sq], d_out.transpose(0, 1), **tol)
        if lse is not None:
            torch.testing.assert_close(lse[:, sq], d_lse, **tol)


@fused
def test_varlen_rows_past_the_last_sequence(backend, device):
    """total_q may exceed cu_seqlens_q[-1]: those rows belong to no sequence and come back as 0."""
    t = packed((5, 7), (6, 6), 2, 2, 16)
    t["q"] = torch.cat([t["q"], torch.randn(3, 2, 16)])
    t = low_precision(t, backend)
    out = varlen(backend, **t, lens=((5, 7), (6, 6)))
    assert out.shape == (15, 2, 16)
    assert torch.all(out[12:] == 0)
    ref = varlen("reference", **{n: x.double() if x.is_floating_point() else x for n, x in t.items()},
                 lens=((5, 7), (6, 6)))
    torch.testing.assert_close(out.double(), ref, **(TIGHT if out.dtype == torch.float32 else LOOSE))


@fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_varlen_dtypes_with_alibi(backend, device, dtype):
    lens = ((17, 9, 1), (17, 33, 4))
    t = packed(*lens, 4, 1, 32)
    t["alibi_slopes"] = torch.rand(3, 4)
    check(backend, t, dtype, fn=functools.partial(varlen, lens=lens), is_causal=True, causal_alignment="bottom_right")


# ----------------------------------------------------------------------------------------------------------
# combinations

@fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["bool", "float-grad"])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_combo(backend, device, dtype, mask_kind, align):
    t = qkv((2, 4, 33, 32), (2, 2, 65, 32), (2, 2, 65, 24))
    t["attn_mask"] = torch.rand(2, 1, 33, 65) > 0.2 if mask_kind == "bool" else torch.randn(1, 4, 33, 65)
    t["alibi_slopes"] = torch.rand(2, 4) * 0.3
    grads = ("q", "k", "v", "attn_mask") if mask_kind == "float-grad" else ("q", "k", "v")
    check(backend, t, dtype, grads, window_size=(16, 8), softcap=8.0, enable_gqa=True, causal_alignment=align,
          return_lse=True, scale=0.2)


@fused
def test_combo_bigger(backend, device):
    """Many blocks: long enough that every block-skipping rule is exercised."""
    t = qkv((1, 4, 200, 64), (1, 2, 300, 64), (1, 2, 300, 64))
    t["alibi_slopes"] = torch.rand(4) * 0.1
    check(backend, t, half_dtype(backend), window_size=(64, 16), softcap=20.0, enable_gqa=True, is_causal=True,
          causal_alignment="bottom_right")


TILE_SETUPS = {
    "causal-br-window-floatmask": dict(causal_alignment="bottom_right", window_size=(700, 0)),
    "softcap-alibi-lse": dict(softcap=20.0, return_lse=True),
}


@pytest.mark.parametrize("backend,device", backend_params(["cpu"]))
@pytest.mark.parametrize("tile", ["128x256", "256x512", "40x18"])
@pytest.mark.parametrize("setup", TILE_SETUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpu_prefill_tiles(backend, device, tile, setup, dtype, monkeypatch):
    """Each tile shape the CPU forward's prefill may take (by default the core's L2 picks 128 x 256 or 256 x 512;
    PYATTN_CPU_FWD_TILE sets it), and an odd one: several q and key blocks of each, partial last blocks, GQA."""
    monkeypatch.setenv("PYATTN_CPU_FWD_TILE", tile)
    t = qkv((1, 4, 300, 64), (1, 2, 1100, 64), (1, 2, 1100, 48))
    if setup.endswith("floatmask"):
        t["attn_mask"] = torch.randn(300, 1100)
    else:
        t["alibi_slopes"] = torch.rand(4) * 0.1
    check(backend, t, dtype, enable_gqa=True, **TILE_SETUPS[setup])


@pytest.mark.parametrize("value", ["0x256", "128x7", "128", "128x256x", "big"])
def test_cpu_prefill_tile_setting_is_checked(value, monkeypatch):
    monkeypatch.setenv("PYATTN_CPU_FWD_TILE", value)
    q, k = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    with pytest.raises(RuntimeError, match=f"PYATTN_CPU_FWD_TILE must be QxK .* got '{value}'"):
        pyattn.scaled_dot_product_attention(q, k, k, backend="cpu")


def test_explicit_oracle_agrees_with_torch():
    """explicit() itself against torch on what torch can do (mask + causal + gqa + scale)."""
    q, k, v = torch.randn(2, 4, 9, 16).double(), torch.randn(2, 2, 17, 16).double(), torch.randn(2, 2, 17, 8).double()
    m = torch.rand(9, 17) > 0.3
    exp = explicit(q, k, v, attn_mask=m, is_causal=True, scale=0.4, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m & torch.ones(9, 17, dtype=torch.bool).tril(), scale=0.4,
                                         enable_gqa=True)
    torch.testing.assert_close(exp, ref, atol=1e-12, rtol=1e-12)
