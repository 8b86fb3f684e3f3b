"""Drop-in equivalence with torch.nn.functional.scaled_dot_product_attention, forward and backward: the values over
a grid of lengths, head dims, ranks and broadcasts, strides, masks, GQA, scales, dtypes and layouts. What torch
documents beyond the values (CausalBias, errors, NaN and inf, dropout statistics) is test_conformance.py's.

Oracle: torch's math in float64. Baseline: torch in the tested dtype. Rule: helpers.assert_close_to_oracle.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import pyattn
from helpers import (TORCH_SDPA, backend_params, check_fwd_bwd, default_dtype, dtype_id, half_dtype, qkv,
                     sample_inputs, sdpa_on)

LOW = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check(backend, fn, tensors, dtype=None, grad_names=("q", "k", "v"), torch_fn=None, **kw):
    """fn(sdpa, **tensors) -> output, run with ours, torch in dtype and torch in float64 (torch_fn replaces fn
    for torch where torch needs the arguments spelled differently). dtype: the backend's default if None."""
    torch_fn = torch_fn or fn
    dtype = dtype or default_dtype(backend)
    return check_fwd_bwd(lambda **t: fn(sdpa_on(backend), **t), lambda **t: torch_fn(TORCH_SDPA, **t),
                         lambda **t: torch_fn(TORCH_SDPA, **t), tensors, dtype, grad_names, **kw)


def plain(sdpa, q, k, v, attn_mask=None, **kw):
    return sdpa(q, k, v, attn_mask=attn_mask, **kw)


backends = pytest.mark.parametrize("backend,device", backend_params())


@backends
@pytest.mark.parametrize("case,dtype", sample_inputs(dtypes=ALL_DTYPES, which=("torch",)))
def test_sample_inputs(backend, device, case, dtype):
    t = case.make(device)
    check_fwd_bwd(functools.partial(case.call, backend), functools.partial(case.call, "torch"),
                  functools.partial(case.call, "torch"), t, dtype, case.grad_names)


@backends
@pytest.mark.parametrize("L,S", [(1, 1), (1, 65), (7, 33), (33, 7), (65, 65), (65, 1), (33, 33)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_odd_lengths(backend, device, L, S, causal):
    check(backend, functools.partial(plain, is_causal=causal), qkv((2, 2, L, 16), (2, 2, S, 16), (2, 2, S, 24)))


@backends
@pytest.mark.parametrize("L,S", [(5, 0), (0, 5), (0, 0)], ids=lambda x: str(x))
def test_empty_lengths(backend, device, L, S):
    """torch takes L == 0 or S == 0 (a row with no keys gives 0): so do we."""
    t = qkv((2, 2, L, 16), (2, 2, S, 16), (2, 2, S, 8))
    t["attn_mask"] = torch.randn(L, S)
    check(backend, plain, t, grad_names=("q", "k", "v", "attn_mask"))


@backends
@pytest.mark.parametrize("E,Ev", [(8, 8), (16, 40), (64, 32), (40, 64), (128, 128)], ids=lambda x: str(x))
def test_head_dims(backend, device, E, Ev):
    check(backend, plain, qkv((1, 2, 33, E), (1, 2, 17, E), (1, 2, 17, Ev)))


@backends
@pytest.mark.parametrize("E,Ev", [(192, 128), (512, 512), (576, 512)], ids=lambda x: f"E{x}")
def test_head_dims_of_new_models(backend, device, E, Ev):
    """Gemma-style 512, DeepSeek MLA's 576 / 512 and 192 / 128, causal with GQA; a backend that declares a smaller
    limit is skipped with its own reason (the limit is what auto routes on)."""
    limit = pyattn.backends.BACKENDS[backend].max_head_dim if backend in pyattn.backends.BACKENDS else None
    if limit is not None and max(E, Ev) > limit:
        pytest.skip(f"{backend} declares head dims up to {limit}")
    t = qkv((1, 4, 33, E), (1, 2, 40, E), (1, 2, 40, Ev))
    check(backend, functools.partial(plain, is_causal=True, enable_gqa=True), t)


@backends
@pytest.mark.parametrize("shapes", [
    pytest.param(((33, 16), (17, 16), (17, 8)), id="2d"),
    pytest.param(((3, 33, 16), (3, 17, 16), (3, 17, 8)), id="3d"),
    pytest.param(((2, 3, 33, 16), (2, 3, 17, 16), (2, 3, 17, 8)), id="4d"),
    pytest.param(((2, 2, 3, 9, 16), (2, 2, 3, 17, 16), (2, 2, 3, 17, 16)), id="5d"),
    pytest.param(((2, 3, 33, 16), (1, 3, 17, 16), (1, 3, 17, 16)), id="bcast-kv-batch"),
    pytest.param(((2, 3, 33, 16), (2, 1, 17, 16), (2, 1, 17, 16)), id="bcast-kv-heads"),
    pytest.param(((1, 3, 33, 16), (2, 3, 17, 16), (2, 3, 17, 16)), id="bcast-q-batch"),
    pytest.param(((2, 2, 3, 9, 16), (1, 2, 1, 17, 16), (2, 1, 3, 17, 8)), id="bcast-5d-mixed"),
    pytest.param(((3, 9, 16), (2, 3, 17, 16), (2, 3, 17, 16)), id="bcast-rank-3-vs-4"),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ranks_and_broadcast(backend, device, shapes, causal):
    check(backend, functools.partial(plain, is_causal=causal), qkv(*shapes))


def _transposed(sdpa, q, k, v, **kw):  # (B, L, H, E) storage, viewed as (B, H, L, E)
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)


def _strided(sdpa, q, k, v, **kw):  # last-dim stride 2
    return sdpa(q[..., ::2], k[..., ::2], v[..., 1::2], **kw)


def _expanded(sdpa, q, k, v, **kw):  # k, v (1, 1, S, E) expanded to (B, H, S, E): stride 0
    return sdpa(q, k.expand(q.shape[0], q.shape[1], -1, -1), v.expand(q.shape[0], q.shape[1], -1, -1), **kw)


def _sliced(sdpa, q, k, v, **kw):  # a window of a longer buffer (kv cache style), and every other head
    return sdpa(q[:, ::2], k[:, ::2, 3:20], v[:, ::2, 3:20], **kw)


@backends
@pytest.mark.parametrize("fn,shapes", [
    pytest.param(_transposed, ((2, 33, 3, 16), (2, 17, 3, 16), (2, 17, 3, 16)), id="transpose12"),
    pytest.param(_strided, ((2, 3, 33, 32), (2, 3, 17, 32), (2, 3, 17, 16)), id="lastdim-stride2"),
    pytest.param(_expanded, ((2, 3, 33, 16), (1, 1, 17, 16), (1, 1, 17, 16)), id="expand"),
    pytest.param(_sliced, ((2, 4, 33, 16), (2, 4, 40, 16), (2, 4, 40, 16)), id="slice-heads-and-cache"),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_noncontiguous(backend, device, fn, shapes, causal):
    check(backend, functools.partial(fn, is_causal=causal), qkv(*shapes))


MASK_SHAPES = [(33, 17), (1, 1, 33, 17), (2, 1, 33, 17), (3, 33, 17), (2, 3, 33, 17), (2, 3, 1, 17)]


@backends
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "mask" + "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float", "float-grad"])
def test_masks(backend, device, shape, kind):
    t = qkv((2, 3, 33, 16), (2, 3, 17, 16), (2, 3, 17, 16))
    t["attn_mask"] = torch.rand(shape) > 0.3 if kind == "bool" else torch.randn(shape)
    grads = ("q", "k", "v", "attn_mask") if kind == "float-grad" else ("q", "k", "v")
    check(backend, plain, t, grad_names=grads)


@backends
@pytest.mark.parametrize("kind", ["bool", "float", "float-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_fully_masked_rows(backend, device, kind, dtype):
    """Rows with no allowed key give 0 and zero grads, never NaN (torch does the same)."""
    t = qkv((2, 2, 9, 16), (2, 2, 17, 16), (2, 2, 17, 16))
    allowed = torch.rand(2, 1, 9, 17) > 0.3
    allowed[:, :, 3] = False
    allowed[1, :, 0] = False
    t["attn_mask"] = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    grads = ("q", "k", "v", "attn_mask") if kind == "float-grad" else ("q", "k", "v")
    (out,), g = check(backend, plain, t, dtype, grad_names=grads)
    assert torch.all(out[:, :, 3] == 0) and torch.all(out[1, :, 0] == 0)
    assert torch.all(g[0][:, :, 3] == 0), "grad of q for a fully masked row must be 0"
    for name, gi in zip(grads, g):
        assert not gi.isnan().any(), f"NaN in grad of {name}"


@backends
@pytest.mark.parametrize("L,S", [(33, 33), (17, 33), (33, 17)], ids=lambda x: str(x))
@pytest.mark.parametrize("kind", ["bool", "float-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_mask_inside_causal_band(backend, device, L, S, kind, dtype):
    """A mask and the causal band together, spelled window_size=(-1, 0): torch on the mask restricted to the band."""
    t = qkv((2, 2, L, 16), (2, 2, S, 16), (2, 2, S, 16))
    t["attn_mask"] = torch.rand(2, 1, L, S) > 0.3 if kind == "bool" else torch.randn(1, 2, L, S)
    grads = ("q", "k", "v", "attn_mask") if kind == "float-grad" else ("q", "k", "v")

    def in_band(sdpa, q, k, v, attn_mask):
        tril = torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).tril()
        band = attn_mask & tril if kind == "bool" else attn_mask.masked_fill(~tril, float("-inf"))
        return sdpa(q, k, v, attn_mask=band)

    check(backend, functools.partial(plain, window_size=(-1, 0)), t, dtype, grad_names=grads, torch_fn=in_band)


@backends
@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0, 2.5])
def test_explicit_scale(backend, device, scale):
    check(backend, functools.partial(plain, scale=scale, is_causal=scale == 1.0),
          qkv((2, 2, 33, 16), (2, 2, 33, 16), (2, 2, 33, 16)))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_run_on_torch():
    """Jagged nested tensors have torch's own SDPA rules: the drop-in hands them to it; pyattn's extras refuse."""
    seqs = [torch.randn(5, 2, 8), torch.randn(3, 2, 8)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)  # (B, H, j, E)
    got, want = pyattn.scaled_dot_product_attention(nt, nt, nt), F.scaled_dot_product_attention(nt, nt, nt)
    assert got.is_nested and all(torch.equal(a, b) for a, b in zip(got.unbind(), want.unbind()))
    with pytest.raises(pyattn.AttentionInputError, match=r"nested .*\['softcap'\].*varlen_attention"):
        pyattn.scaled_dot_product_attention(nt, nt, nt, softcap=2.0)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_scalar_arguments_as_torch_takes_them(kind):
    """scale and dropout_p as a NumPy number or a one-element tensor, as torch's float arguments take them."""
    import numpy as np
    as_kind = np.float32 if kind == "numpy" else torch.tensor
    q, k, v = qkv((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)).values()
    torch.manual_seed(0)
    want = pyattn.scaled_dot_product_attention(q, k, v, scale=0.25, dropout_p=0.5)
    torch.manual_seed(0)
    got = pyattn.scaled_dot_product_attention(q, k, v, scale=as_kind(0.25), dropout_p=as_kind(0.5))
    assert torch.equal(got, want)


@backends
@pytest.mark.parametrize("shapes", [
    pytest.param(((2, 8, 33, 16), (2, 2, 17, 16), (2, 2, 17, 16)), id="gqa-8-2"),
    pytest.param(((2, 4, 33, 16), (2, 1, 33, 16), (2, 1, 33, 24)), id="mqa-4-1"),
    pytest.param(((6, 17, 16), (3, 33, 16), (3, 33, 16)), id="gqa-3d-6-3"),
    pytest.param(((2, 6, 17, 16), (1, 2, 33, 16), (1, 2, 33, 16)), id="gqa-bcast-batch"),
    pytest.param(((2, 2, 4, 9, 16), (2, 2, 2, 17, 16), (2, 2, 2, 17, 16)), id="gqa-5d"),
    pytest.param(((2, 4, 9, 16), (2, 2, 17, 16), (2, 1, 17, 16)), id="gqa-k2-v1"),  # torch repeats each its way
    pytest.param(((2, 6, 9, 16), (2, 2, 17, 16), (2, 3, 17, 16)), id="gqa-k2-v3"),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(backend, device, shapes, causal):
    check(backend, functools.partial(plain, enable_gqa=True, is_causal=causal), qkv(*shapes))


@backends
def test_gqa_with_no_heads(backend, device):
    """enable_gqa with 0 query and 0 key/value heads gives an empty output, as torch's."""
    check(backend, functools.partial(plain, enable_gqa=True), qkv((2, 0, 5, 8), (2, 0, 7, 8), (2, 0, 7, 8)))


@backends
def test_gqa_with_mask(backend, device):
    t = qkv((2, 6, 17, 16), (2, 2, 33, 16), (2, 2, 33, 16))
    t["attn_mask"] = torch.randn(2, 6, 17, 33)
    check(backend, functools.partial(plain, enable_gqa=True), t, grad_names=("q", "k", "v", "attn_mask"))


@backends
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("setup", ["plain-L65-S33", "causal-L33-S65", "boolmask", "floatmask-grad", "gqa",
                                   "E64-L70"])
def test_dtypes(backend, device, dtype, setup):
    L, S, E = {"plain-L65-S33": (65, 33, 32), "causal-L33-S65": (33, 65, 32), "E64-L70": (70, 70, 64)}.get(
        setup, (33, 33, 32))
    hkv = 2 if setup == "gqa" else 4
    t = qkv((2, 4, L, E), (2, hkv, S, E), (2, hkv, S, E))
    grads = ("q", "k", "v")
    if setup == "boolmask":
        t["attn_mask"] = torch.rand(L, S) > 0.3
    if setup == "floatmask-grad":
        t["attn_mask"] = torch.randn(2, 1, L, S)
        grads += ("attn_mask",)
    check(backend, functools.partial(plain, is_causal=setup.startswith("causal"), enable_gqa=setup == "gqa"), t,
          dtype, grad_names=grads)


@backends
def test_one_bigger_case(backend, device):
    """Several key blocks and query blocks in every direction, bf16, causal, GQA."""
    check(backend, functools.partial(plain, is_causal=True, enable_gqa=True),
          qkv((1, 4, 300, 64), (1, 2, 333, 64), (1, 2, 333, 64)), half_dtype(backend))


@backends
@pytest.mark.parametrize("layout", ["BHLE", "BLHE"])
def test_output_layout(backend, device, layout):
    """Same shape, dtype and memory layout as torch (out laid out like q: a model's q = x.view(B, L, H, E)
    .transpose(1, 2) gets an out whose .transpose(1, 2) is contiguous), on the input's device; inputs are not
    modified."""
    def make(B, H, L, E):
        x = torch.randn(B, H, L, E) if layout == "BHLE" else torch.randn(B, L, H, E).transpose(1, 2)
        return x.to(default_dtype(backend))
    # Ev != E for BHLE; E == Ev for BLHE, where torch runs its flash kernel (its math backend returns contiguous)
    t = dict(q=make(2, 3, 9, 16), k=make(2, 3, 17, 16), v=make(2, 3, 17, 8 if layout == "BHLE" else 16))
    before = {n: x.clone() for n, x in t.items()}
    out = sdpa_on(backend)(t["q"], t["k"], t["v"])
    ref = F.scaled_dot_product_attention(t["q"], t["k"], t["v"])
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    assert out.stride() == ref.stride()
    for n in t:
        assert torch.equal(t[n], before[n]), f"{n} was modified"
