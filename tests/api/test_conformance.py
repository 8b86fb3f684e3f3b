"""pyattn against torch.nn.functional.scaled_dot_product_attention on what torch documents, written from its docs:

- a CausalBias (causal_upper_left / causal_lower_right) as attn_mask is the causal band in its alignment: forward,
  backward and compiled, never materialised; with is_causal=True it raises, as torch's does;
- invalid inputs (attn_mask with is_causal=True among them) raise a RuntimeError, as torch's do (pyattn's is also a
  ValueError or TypeError) naming the argument and the shapes;
- NaN and inf in q, k, v or a float mask reach the output rows and gradients they touch, as in torch;
- dropout does not replay torch's random stream (no fused kernel does) but has its statistics.
The values over a grid of shapes, masks, GQA, dtypes and layouts are test_dropin.py's; the same grid through torch's
own function routed by pyattn.enabled() is test_routing.py's.

Oracle: torch in float64; baseline: torch in the tested dtype; rule: helpers.assert_close_to_oracle.
"""
import functools
import math

import pytest
import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import pyattn
from helpers import TORCH_SDPA, backend_params, check_fwd_bwd, default_dtype, qkv, sdpa_on

NAN = float("nan")
BIASES = {"upper_left": causal_upper_left, "lower_right": causal_lower_right}
backends = pytest.mark.parametrize("backend,device", backend_params())


# ---------------------------------------------------------------------------------------------------------
# CausalBias

@backends
@pytest.mark.filterwarnings("ignore:Lower right causal bias")
@pytest.mark.parametrize("variant", list(BIASES))
@pytest.mark.parametrize("L,S,Hkv", [(23, 56, 2), (56, 23, 2), (33, 33, 1)], ids=["L<S", "L>S", "L=S-gqa"])
def test_causal_bias(backend, device, variant, L, S, Hkv):
    """Both alignments, forward and backward, against torch given the same bias (L > S lower-right leaves the first
    rows with no key: 0, as torch's CPU path gives)."""
    def attend(sdpa, q, k, v):
        return sdpa(q, k, v, attn_mask=BIASES[variant](L, S), enable_gqa=Hkv == 1)

    t = qkv((2, 2, L, 16), (2, Hkv, S, 16), (2, Hkv, S, 16))
    check_fwd_bwd(functools.partial(attend, sdpa_on(backend)), functools.partial(attend, TORCH_SDPA),
                  functools.partial(attend, TORCH_SDPA), t, default_dtype(backend))


@backends
@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_is_never_materialised(backend, device, variant, monkeypatch):
    """The kernels' causal band stands in for the bias: nothing reads its (meaningless) storage or builds its L x S
    tensor. explain names the band."""
    monkeypatch.setattr(CausalBias, "_materialize", lambda *a, **k: pytest.fail("the bias was materialised"))
    q, k, v = (x.to(device, default_dtype(backend)).requires_grad_() for x in qkv((1, 2, 9, 16), (1, 2, 20, 16),
                                                                                  (1, 2, 20, 16)).values())
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=BIASES[variant](9, 20), backend=backend)
    out.sum().backward()
    assert out.isfinite().all() and q.grad.isfinite().all()
    text = pyattn.explain(q, k, v, attn_mask=BIASES[variant](9, 20))
    assert "causal" in text and ("bottom_right alignment" in text) == (variant == "lower_right"), text


@pytest.mark.parametrize("backend,device", backend_params(fused_only=True))
@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_compiled(backend, device, variant):
    """torch.compile(fullgraph=True), the bias an argument of the compiled function, forward and backward."""
    torch._dynamo.reset()

    def fn(q, k, v, bias):
        return pyattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend=backend) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    t = [x.to(device, default_dtype(backend)).requires_grad_() for x in qkv((1, 2, 9, 16), (1, 2, 20, 16),
                                                                          (1, 2, 20, 16)).values()]
    bias = BIASES[variant](9, 20)
    got = compiled(*t, bias)
    want = fn(*t, bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), t), torch.autograd.grad(want.sum(), t))


@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_errors(variant):
    q, k, v = qkv((1, 2, 9, 16), (1, 2, 20, 16), (1, 2, 20, 16)).values()
    bias = BIASES[variant](9, 20)
    with pytest.raises(ValueError):  # what torch raises
        TORCH_SDPA(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(pyattn.AttentionInputError, match="is_causal=True") as info:
        pyattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    assert isinstance(info.value, ValueError) and "CausalBias" in str(info.value)
    with pytest.raises(pyattn.AttentionInputError, match=rf"attn_mask causal_{variant}\(9, 21\).*S=20"):
        pyattn.scaled_dot_product_attention(q, k, v, attn_mask=BIASES[variant](9, 21))
    if variant == "upper_left":
        with pytest.raises(pyattn.AttentionInputError, match="top-left aligned but causal_alignment='bottom_right'"):
            pyattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, causal_alignment="bottom_right")


# ---------------------------------------------------------------------------------------------------------
# invalid inputs: torch raises RuntimeError, and so does pyattn

def _args(q=(2, 3, 5, 16), k=(2, 3, 7, 16), v=(2, 3, 7, 8), dtypes=(torch.float32,) * 3, **kw):
    def tensor(shape, dtype):
        return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
    return dict(query=tensor(q, dtypes[0]), key=tensor(k, dtypes[1]), value=tensor(v, dtypes[2]), **kw)


F32, F16, I64 = torch.float32, torch.float16, torch.int64
INVALID = [  # (id, arguments, what pyattn's message must name)
    ("1d-inputs", lambda: _args((16,), (16,), (16,)), ["query", "(16,)"]),
    ("mixed-dtypes", lambda: _args(dtypes=(F32, F32, F16)), ["dtype", "value", "float16", "(2, 3, 7, 8)"]),
    ("int-inputs", lambda: _args(dtypes=(I64,) * 3), ["query", "int64", "(2, 3, 5, 16)"]),
    ("head-dim-mismatch", lambda: _args(k=(2, 3, 7, 8)), ["head dim", "(2, 3, 5, 16)", "(2, 3, 7, 8)"]),
    ("batch-not-broadcastable", lambda: _args(k=(3, 3, 7, 16), v=(3, 3, 7, 8)), ["broadcast", "(3, 3, 7, 16)"]),
    ("gqa-not-multiple", lambda: _args((2, 5, 5, 16), (2, 2, 7, 16), (2, 2, 7, 8), enable_gqa=True),
     ["heads", "(2, 5, 5, 16)", "(2, 2, 7, 16)"]),
    ("mask-not-broadcastable", lambda: _args(attn_mask=torch.ones(6, 7, dtype=torch.bool)),
     ["attn_mask", "(6, 7)", "(2, 3, 5, 7)"]),
    ("mask-int", lambda: _args(attn_mask=torch.ones(5, 7, dtype=I64)), ["attn_mask", "int64", "(5, 7)"]),
    ("mask-float64-on-fp32", lambda: _args(attn_mask=torch.zeros(5, 7, dtype=torch.float64)),
     ["attn_mask", "float64", "(5, 7)"]),
    # torch documents that attn_mask with is_causal=True raises; pyattn names the spelling it takes for both
    ("bool-mask-with-causal", lambda: _args(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True),
     ["attn_mask", "(5, 7)", "is_causal=True", "window_size=(-1, 0)"]),
    ("float-mask-with-causal", lambda: _args(attn_mask=torch.zeros(5, 7), is_causal=True),
     ["attn_mask", "(5, 7)", "is_causal=True", "window_size=(-1, 0)"]),
    ("float-mask-grad-with-causal", lambda: _args(attn_mask=torch.zeros(5, 7, requires_grad=True), is_causal=True),
     ["attn_mask", "(5, 7)", "is_causal=True"]),
    ("dropout-above-1", lambda: _args(dropout_p=1.5), ["dropout_p", "1.5"]),
]


@pytest.mark.parametrize("make,needles", [pytest.param(*c[1:], id=c[0]) for c in INVALID])
def test_invalid_inputs_raise_like_torch(make, needles):
    with pytest.raises(RuntimeError):
        TORCH_SDPA(**make())
    with pytest.raises(RuntimeError) as info:
        pyattn.scaled_dot_product_attention(**make())
    error = info.value
    assert isinstance(error, pyattn.AttentionInputError) and isinstance(error, (ValueError, TypeError))
    for needle in needles:
        assert needle in str(error), f"message {str(error)!r} does not mention {needle!r}"


# ---------------------------------------------------------------------------------------------------------
# NaN and inf

L, S = 24, 40


def _poison(name, index, value=NAN):
    def poison(t):
        t[name][(..., *index)] = value
    return poison


def _mask_setup(kind, fill=None):
    """A mask of kind "float" (0 but fill at (3, 9)), "col7-out" (bool, key 7 masked out of every row) or "row5-out"
    (bool, row 5 fully masked)."""
    def setup(t):
        if kind == "float":
            t["attn_mask"] = torch.zeros(L, S)
            t["attn_mask"][3, 9] = fill
        else:
            t["attn_mask"] = torch.ones(L, S, dtype=torch.bool)
            t["attn_mask"][(slice(None), 7) if kind == "col7-out" else (5,)] = False
    return setup


ALL_ROWS, NO_ROWS = set(range(L)), set()
# (id, setup, is_causal, rows whose output must be NaN, rows that must stay finite, whole NaN pattern of out and
# grads is torch's). Rows in neither set (keys outside a row's causal band) are unspecified: torch's own kernels
# disagree there (its math kernel reads them, its flash kernel skips them, as pyattn's do).
NAN_CASES = [
    ("q-row-nan", [_poison("q", (5, slice(None)))], False, {5}, ALL_ROWS - {5}, True),
    ("q-elem-inf", [_poison("q", (5, 0), float("inf"))], False, {5}, ALL_ROWS - {5}, True),
    ("k-row-nan", [_poison("k", (7, slice(None)))], False, ALL_ROWS, NO_ROWS, True),
    ("v-row-nan", [_poison("v", (7, slice(None)))], False, ALL_ROWS, NO_ROWS, True),
    ("k-row-nan-causal", [_poison("k", (7, slice(None)))], True, set(range(7, L)), NO_ROWS, False),
    ("float-mask-nan", [_mask_setup("float", NAN)], False, {3}, ALL_ROWS - {3}, True),
    ("float-mask-inf", [_mask_setup("float", float("inf"))], False, {3}, ALL_ROWS - {3}, True),
    # a False in a bool mask adds -inf in torch, so NaN under it still shows
    ("k-nan-under-bool-mask", [_mask_setup("col7-out"), _poison("k", (7, slice(None)))], False, ALL_ROWS, NO_ROWS,
     False),
    ("q-nan-fully-masked-row", [_mask_setup("row5-out"), _poison("q", (5, slice(None)))], False, {5},
     ALL_ROWS - {5}, False),
]


def _nan_run(sdpa, t, is_causal, dtype):
    """-> out (B, H, L, E), grads of q, k, v (and a float mask) for a fixed cotangent, all float32."""
    args = {n: x.to(dtype).requires_grad_() if x.is_floating_point() else x for n, x in t.items()}
    out = sdpa(args["q"], args["k"], args["v"], attn_mask=args.get("attn_mask"), is_causal=is_causal)
    wrt = [x for x in args.values() if x.requires_grad]
    grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
    return [out.float()] + [g.float() for g in grads]


@backends
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the Triton interpreter, about the NaN itself
@pytest.mark.parametrize("setups,is_causal,nan_rows,finite_rows,whole",
                         [pytest.param(*c[1:], id=c[0]) for c in NAN_CASES])
def test_nan_and_inf_reach_what_they_touch(backend, device, setups, is_causal, nan_rows, finite_rows, whole):
    t = qkv((1, 2, L, 16), (1, 2, S, 16), (1, 2, S, 16))
    for setup in setups:
        setup(t)
    dtype = default_dtype(backend)
    got = _nan_run(sdpa_on(backend), t, is_causal, dtype)
    want = _nan_run(TORCH_SDPA, t, is_causal, dtype)
    names = ["out", "grad of q", "grad of k", "grad of v", "grad of attn_mask"]
    for name, g, w in zip(names[:2], got[:2], want[:2]):  # out and dq: row by row
        rows = g.isnan().any(-1).any(1)[0]
        nan = {i for i in range(L) if rows[i]}
        assert nan_rows <= nan and not nan & finite_rows, f"{name}: NaN rows {sorted(nan)}"
        assert torch.equal(w.isnan().any(-1).any(1)[0][sorted(nan_rows | finite_rows)],
                           rows[sorted(nan_rows | finite_rows)]), f"{name}: torch's NaN rows differ"
    if whole:
        # against torch's math kernel, its definition: its flash kernel on AVX2 loses NaN in dk and dv that the same
        # kernel keeps on AVX-512 (q-elem-inf: 16 of 40 rows of dv NaN on avx2, 40 on avx512 and in math)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            want = _nan_run(TORCH_SDPA, t, is_causal, dtype)
        for name, g, w in zip(names[2:], got[2:], want[2:]):
            assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN where torch has none or the reverse"
    for name, g in zip(names, got):
        assert not g.isinf().any(), f"{name}: inf"


# ---------------------------------------------------------------------------------------------------------
# dropout: torch's statistics, not its random stream

@pytest.mark.parametrize("backend,device", backend_params(["cpu", "triton", "reference"]))
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_statistics_match_torch(backend, device, p):
    """With V = I (Ev = S) the output is the dropped weight matrix itself: each weight is kept with probability
    1 - p and scaled by 1 / (1 - p), as torch does; the same seed gives the same draw."""
    B, H, Lq, Sk = 2, 2, 16, 64
    q, k = torch.randn(B, H, Lq, 16), torch.randn(B, H, Sk, 16)
    v = torch.eye(Sk).expand(B, H, Sk, Sk)
    weights = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 4.0, -1)
    sdpa = sdpa_on(backend)
    for fn in (sdpa, TORCH_SDPA):
        torch.manual_seed(7)
        out = fn(q, k, v, dropout_p=p).double()
        kept = out != 0
        dropped = 1.0 - kept.double().mean().item()
        assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / kept.numel()), f"dropped {dropped:.3f}, p = {p}"
        torch.testing.assert_close(out[kept], (weights / (1 - p))[kept], rtol=1e-4, atol=1e-6)
    torch.manual_seed(7)
    again = sdpa(q, k, v, dropout_p=p).double()
    torch.manual_seed(7)
    assert torch.equal(sdpa(q, k, v, dropout_p=p).double(), again)
