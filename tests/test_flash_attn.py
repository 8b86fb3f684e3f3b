"""pyattn.flash_attn against FlashAttention 2.x's documented semantics, written out here in float64.

The oracle below is plain torch math in flash-attn's own layout (batch, seqlen, nheads, headdim), written from
flash-attn's docstrings: causal and windows bottom-right aligned (query i sits at key position
i + seqlen_k - seqlen_q), ALiBi -slope * |i' - j|, softcap c * tanh(s / c), rows with no key -> out 0 and
softmax_lse +inf, rotary at cache positions cache_seqlens[b] + i. The functions take no backend argument, so each
test forces one by narrowing pyattn's auto order.
"""
import inspect

import pytest
import torch

import pyattn
from pyattn import backends
from pyattn.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                               flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                               flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from conftest import ATOL, assert_close_to_oracle, backend_device, backend_params, check_fwd_bwd, dtype_id

DENSE_BACKENDS = backend_params(["cpu", "reference", "triton", "cuda"], lower_capabilities=False)
# kvcache_attention runs on the CPU kernel and the reference (the GPU backends leave it to the reference: auto)
KV_BACKENDS = backend_params(["cpu", "reference"], lower_capabilities=False) + [
    pytest.param("auto", "cuda", id="cuda-auto",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.fixture
def forced(monkeypatch, backend, device):
    """Runs the test's calls on `backend` (flash-attn's functions have no backend argument): auto tries only it."""
    if backend != "auto":
        monkeypatch.setitem(backends.AUTO_ORDER, device, (backend,))
    return device


def skip_dtype(backend, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("triton: float32 here (the interpreter's bf16 dot is wrong; float64 is not a Triton dtype)")
    if backend == "cuda" and dtype in (torch.float32, torch.float64):
        pytest.skip("the CUDA C++ kernels take float16/bfloat16")


# ----------------------------------------------------------------------------------------------------------
# the oracle, from flash-attn's docstrings

def ref_attn(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None,
             upcast=True):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, Dv), lse (B, H, Sq). upcast: float64 math (the oracle),
    else the inputs' dtype (the baseline whose error sets the tolerance)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    Sq, Sk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q, k).float() * scale if not upcast else \
        torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None] + Sk - Sq  # bottom-right: query i sits at key position i'
    j = torch.arange(Sk, device=q.device)[None, :]
    left, right = window_size
    if causal:
        right = 0
    allowed = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype).expand(q.shape[0], q.shape[2])
        s = s - slopes[:, :, None, None] * (i - j).abs()
    s = s.masked_fill(~allowed, float("-inf"))
    # softmax written so that rows with no key give p = 0, lse = +inf and finite gradients
    m = s.amax(-1, keepdim=True).detach()
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    empty = denom == 0
    denom = denom.masked_fill(empty, 1.0)
    p = e / denom
    out = torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), v)
    lse = (m + torch.log(denom)).masked_fill(empty, float("inf")).squeeze(-1).float()
    return out.to(dtype if not upcast else torch.float64), lse


def rope_ref(x, cos, sin, pos, interleaved):
    """Rotary as a complex product: feature pairs (2m, 2m+1) (interleaved) or (m, m + rd/2) rotate by the angle
    whose cos/sin are rows pos (B, L) of cos/sin (seqlen_ro, rd/2); features past rd stay. float64."""
    rd = cos.shape[1] * 2
    x = x.double()
    r = x[..., :rd]
    if interleaved:
        z = torch.complex(r[..., 0::2], r[..., 1::2])
    else:
        z = torch.complex(r[..., :rd // 2], r[..., rd // 2:])
    w = torch.complex(cos.double()[pos], sin.double()[pos])[:, :, None]  # (B, L, 1, rd/2)
    z = z * w
    r = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
    return torch.cat([r, x[..., rd:]], -1)


def tensors(B, Sq, Sk, H, Hk, D, Dv=None, alibi=None):
    t = {"q": torch.randn(B, Sq, H, D), "k": torch.randn(B, Sk, Hk, D), "v": torch.randn(B, Sk, Hk, Dv or D)}
    if alibi:
        t["alibi_slopes"] = torch.rand(*alibi) * 0.5
    return t


def check(fn, ref, t, dtype, grads=("q", "k", "v"), atol=None):
    """fn(**t) against ref(**t, upcast=True) (float64) with ref(**t, upcast=False) in dtype as the baseline."""
    return check_fwd_bwd(fn, lambda **x: ref(**x, upcast=False), lambda **x: ref(**x, upcast=True), t, dtype,
                         grads, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# the interface itself

FLASH_SIGNATURES = {  # flash-attn 2.x's parameters and defaults, in order (flash_attn/flash_attn_interface.py)
    flash_attn_func: "q k v dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                     "alibi_slopes=None deterministic=False return_attn_probs=False",
    flash_attn_qkvpacked_func: "qkv dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                               "alibi_slopes=None deterministic=False return_attn_probs=False",
    flash_attn_kvpacked_func: "q kv dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                              "alibi_slopes=None deterministic=False return_attn_probs=False",
    flash_attn_varlen_func: "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                            "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                            "deterministic=False return_attn_probs=False block_table=None",
    flash_attn_varlen_qkvpacked_func: "qkv cu_seqlens max_seqlen dropout_p=0.0 softmax_scale=None causal=False "
                                      "window_size=(-1, -1) softcap=0.0 alibi_slopes=None deterministic=False "
                                      "return_attn_probs=False",
    flash_attn_varlen_kvpacked_func: "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                                     "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                                     "alibi_slopes=None deterministic=False return_attn_probs=False",
    flash_attn_with_kvcache: "q k_cache v_cache k=None v=None rotary_cos=None rotary_sin=None cache_seqlens=None "
                             "cache_batch_idx=None cache_leftpad=None block_table=None softmax_scale=None "
                             "causal=False window_size=(-1, -1) softcap=0.0 rotary_interleaved=True "
                             "alibi_slopes=None num_splits=0 return_softmax_lse=False",
}


@pytest.mark.parametrize("fn", FLASH_SIGNATURES, ids=lambda f: f.__name__)
def test_signature_is_flash_attn_2(fn):
    params = inspect.signature(fn).parameters.values()
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    got = " ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
    assert got == FLASH_SIGNATURES[fn]


def test_submodule_exported():
    assert pyattn.flash_attn.flash_attn_func is flash_attn_func
    assert set(pyattn.flash_attn.__all__) == {f.__name__ for f in FLASH_SIGNATURES}


# ----------------------------------------------------------------------------------------------------------
# flash_attn_func and its packed forms

DENSE_OPTS = [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"window_size": (3, 2)}, id="window"),
    pytest.param({"causal": True, "window_size": (4, 7)}, id="causal-window"),  # causal wins on the right
    pytest.param({"softcap": 2.5, "softmax_scale": 0.3}, id="softcap-scale"),
    pytest.param({"causal": True, "alibi": "H"}, id="causal-alibi"),
    pytest.param({"alibi": "BH", "window_size": (-1, 3)}, id="alibi-BxH-window"),
]
SHAPES = [pytest.param((2, 9, 13, 5, 5, 16), id="Sq<Sk"), pytest.param((1, 13, 6, 5, 1, 24), id="Sq>Sk-mqa")]


@pytest.mark.parametrize("backend,device", DENSE_BACKENDS)
@pytest.mark.parametrize("opts", DENSE_OPTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flash_attn_func(forced, backend, device, opts, shape, dtype):
    skip_dtype(backend, dtype)
    if backend == "triton" and (shape != SHAPES[0].values[0] or "alibi" in opts):
        pytest.skip("the Triton interpreter is slow: one shape, no ALiBi here (tests/test_triton.py has them)")
    opts = dict(opts)
    B, Sq, Sk, H, Hk, D = shape
    alibi = {None: None, "H": (H,), "BH": (B, H)}[opts.pop("alibi", None)]
    t = {n: x.to(device) for n, x in tensors(B, Sq, Sk, H, Hk, D, alibi=alibi).items()}

    def ours(q, k, v, alibi_slopes=None):
        out, lse, s_dmask = flash_attn_func(q, k, v, alibi_slopes=alibi_slopes, return_attn_probs=True, **opts)
        assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
        return out, lse

    def ref(q, k, v, alibi_slopes=None, upcast=True):
        return ref_attn(q, k, v, alibi_slopes=alibi_slopes, upcast=upcast, **opts)

    check(ours, ref, t, dtype)
