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
from helpers import ATOL, assert_close_to_oracle, backend_params, check_fwd_bwd, dtype_id

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
        pytest.skip("the Triton interpreter is slow: one shape, no ALiBi here (tests/backends/test_triton.py has them)")
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


@pytest.mark.parametrize("backend,device", backend_params(["cpu", "reference", "triton"], lower_capabilities=False))
def test_packed_forms_equal_flash_attn_func(forced, backend, device):
    """qkvpacked/kvpacked are flash_attn_func on the unpacked views; gradients land in the packed tensor."""
    B, S, H, Hk, D = 2, 7, 4, 2, 16
    qkv = torch.randn(B, S, 3, H, D, device=device, requires_grad=True)
    q = torch.randn(B, S, H, D, device=device)
    kv = torch.randn(B, S, 2, Hk, D, device=device, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    assert torch.equal(out, flash_attn_func(*qkv.unbind(2), causal=True))
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
    out, lse, s_dmask = flash_attn_kvpacked_func(q, kv, window_size=(2, 1), return_attn_probs=True)
    ref = flash_attn_func(q, *kv.unbind(2), window_size=(2, 1), return_attn_probs=True)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1]) and lse.shape == (B, H, S)
    out.sum().backward()
    assert kv.grad.shape == kv.shape


def test_no_copy_for_the_layout(monkeypatch):
    """The kernel op gets (B, H, S, D) views of the caller's (B, S, H, D) storage: nothing is copied."""
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cpu",))
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    seen = []
    real = torch.ops.pyattn.fwd

    class Spy:
        def __call__(self, *args):
            seen.append(args[:3])
            return real(*args)
    monkeypatch.setattr(torch.ops.pyattn, "fwd", Spy())
    flash_attn_func(q, k, v, causal=True)
    qkv = torch.randn(2, 5, 3, 4, 16)
    flash_attn_qkvpacked_func(qkv)
    (q1, k1, v1), (q2, k2, v2) = seen
    for ours, theirs in ((q1, q), (k1, k), (v1, v)):
        assert ours.data_ptr() == theirs.data_ptr() and ours.stride() == theirs.transpose(1, 2).stride()
    for i, t in enumerate((q2, k2, v2)):
        assert t.data_ptr() == qkv[:, :, i].data_ptr()


@pytest.mark.parametrize("backend,device", backend_params(["cpu", "reference", "triton"], lower_capabilities=False))
def test_dropout(forced, backend, device):
    """Same seed, same result; the result is pyattn's own dropout (bottom-right) with that seed; and the kept
    weights are rescaled by 1 / (1 - p): with q = k = 0 and v = 1 every output has mean 1 over many rows."""
    q, k, v = torch.randn(2, 6, 2, 16, device=device), torch.randn(2, 9, 2, 16, device=device), \
        torch.randn(2, 9, 2, 16, device=device)
    torch.manual_seed(3)
    a = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(3)
    b = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(3)
    c = pyattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.3,
                                            is_causal=True, causal_alignment="bottom_right")
    assert torch.equal(a, b) and torch.equal(a, c.transpose(1, 2))
    assert not torch.allclose(a, flash_attn_func(q, k, v, causal=True))
    z = torch.zeros(1, 64, 2, 8, device=device)
    out = flash_attn_func(z, z, torch.ones(1, 64, 2, 8, device=device), dropout_p=0.5)
    assert abs(out.mean().item() - 1.0) < 0.05 and out.std().item() > 0.05


@pytest.mark.parametrize("backend,device", DENSE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_every_dtype_of_each_backend(forced, backend, device, dtype):
    """float16 too (the grids above use fp32, fp64, bf16): each backend's dtypes through the packed GQA path."""
    if backend == "triton" and dtype not in (torch.float16, torch.float32):
        pytest.skip("the Triton interpreter: float32 and float16")
    if backend == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("the CUDA C++ kernels take float16/bfloat16")
    t = {n: x.to(device) for n, x in tensors(2, 5, 11, 4, 2, 16).items()}

    def ours(q, k, v):
        out, lse, _ = flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True, return_attn_probs=True)
        return out, lse

    check(ours, lambda q, k, v, upcast: ref_attn(q, k, v, causal=True, upcast=upcast), t, dtype)


def test_window_side_of_seqlen_k_or_more_is_unbounded():
    """flash-attn clamps a window side >= seqlen_k (max_seqlen_k for varlen) to -1 before its kernels see it: with
    seqlen_q > seqlen_k, window (-1, seqlen_k) then lets every query see every key (the band formula alone would
    leave the first queries none)."""
    q, k, v = torch.randn(1, 13, 2, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    assert torch.equal(flash_attn_func(q, k, v, window_size=(-1, 6)), flash_attn_func(q, k, v))
    assert not torch.equal(flash_attn_func(q, k, v, window_size=(-1, 5)), flash_attn_func(q, k, v))
    cu_q, cu_k = torch.tensor([0, 13], dtype=torch.int32), torch.tensor([0, 6], dtype=torch.int32)
    args = (q[0], k[0], v[0], cu_q, cu_k, 13, 6)
    assert torch.equal(flash_attn_varlen_func(*args, window_size=(6, 6)), flash_attn_varlen_func(*args))


# ----------------------------------------------------------------------------------------------------------
# varlen

LENS = [pytest.param(((3, 0, 11), (8, 4, 6)), id="3seq-with-empty"), pytest.param(((9,), (4,)), id="Sq>Sk")]
VARLEN_OPTS = [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"window_size": (2, 1), "softcap": 3.0}, id="window-softcap"),
    pytest.param({"causal": True, "alibi": True}, id="causal-alibi"),
]


def packed(lens_q, lens_k, H, Hk, D, device):
    cu = lambda lens: torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)  # noqa: E731
    return dict(q=torch.randn(sum(lens_q), H, D, device=device), k=torch.randn(sum(lens_k), Hk, D, device=device),
                v=torch.randn(sum(lens_k), Hk, D, device=device), cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k))


def ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None, upcast=True, **opts):
    """Every sequence through ref_attn on its own: out (total_q, H, Dv), lse (H, total_q)."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        out, lse = ref_attn(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                            alibi_slopes=None if alibi_slopes is None else alibi_slopes[b], upcast=upcast, **opts)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


@pytest.mark.parametrize("backend,device", DENSE_BACKENDS)
@pytest.mark.parametrize("opts", VARLEN_OPTS)
@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flash_attn_varlen_func(forced, backend, device, opts, lens, dtype):
    skip_dtype(backend, dtype)
    if backend == "triton" and opts.get("alibi"):
        pytest.skip("the Triton interpreter is slow")
    opts = dict(opts)
    t = packed(*lens, 4, 2, 16, device)
    if opts.pop("alibi", False):
        t["alibi_slopes"] = torch.rand(len(lens[0]), 4, device=device)
    mq, mk = max(lens[0]), max(lens[1])

    def ours(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None):
        out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, mq, mk,
                                                   alibi_slopes=alibi_slopes, return_attn_probs=True, **opts)
        assert s_dmask.numel() == 0
        return out, lse

    check(ours, lambda **x: ref_varlen(**x, **opts), t, dtype)


@pytest.mark.parametrize("backend,device", backend_params(["cpu", "reference", "triton"], lower_capabilities=False))
def test_varlen_packed_forms(forced, backend, device):
    lens = (5, 2, 7)
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32, device=device)
    qkv = torch.randn(14, 3, 4, 16, device=device)
    out, lse, _ = flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True, return_attn_probs=True)
    ref = flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 7, 7, causal=True, return_attn_probs=True)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1]) and lse.shape == (4, 14)
    q, kv = torch.randn(14, 4, 16, device=device), torch.randn(14, 2, 2, 16, device=device)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max(lens), max(lens), window_size=(1, 1))
    assert torch.equal(out, flash_attn_varlen_func(q, *kv.unbind(1), cu, cu, 7, 7, window_size=(1, 1)))


@pytest.mark.parametrize("backend,device", backend_params(["cpu", "reference"], lower_capabilities=False))
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (3, 0), "softcap": 2.0}], ids=["causal", "win"])
def test_varlen_paged(forced, backend, device, page_size, opts):
    """block_table: k/v as pages; the result equals the contiguous call on the same keys."""
    lens_q, lens_k, Hk = (3, 5), (9, 6), 2
    t = packed(lens_q, lens_k, 4, Hk, 16, device)
    per_seq = -(-max(lens_k) // page_size)
    pages = 2 * per_seq + 3
    k_pages, v_pages = torch.randn(pages, page_size, Hk, 16), torch.randn(pages, page_size, Hk, 16)
    perm = torch.randperm(pages)
    block_table = torch.stack([perm[b * per_seq:(b + 1) * per_seq] for b in range(2)]).to(torch.int32)
    flat_k = k_pages[block_table.long()].flatten(1, 2)  # (B, per_seq * page_size, Hk, D)
    flat_v = v_pages[block_table.long()].flatten(1, 2)
    k = torch.cat([flat_k[b, :n] for b, n in enumerate(lens_k)])
    v = torch.cat([flat_v[b, :n] for b, n in enumerate(lens_k)])
    args = (t["cu_seqlens_q"], t["cu_seqlens_k"], max(lens_q), max(lens_k))
    out, lse, _ = flash_attn_varlen_func(t["q"], k_pages.to(device), v_pages.to(device), *args, **opts,
                                         return_attn_probs=True, block_table=block_table.to(device))
    ref_out, ref_lse = ref_varlen(t["q"], k.to(device), v.to(device), t["cu_seqlens_q"], t["cu_seqlens_k"], **opts)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache

KV_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True, "rotary": "interleaved"}, id="causal-rotary"),
    pytest.param({"rotary": "halves"}, id="noncausal-rotary-halves"),  # every query at cache_seqlens
    pytest.param({"causal": True, "rotary": "halves", "page_size": 3}, id="paged-rotary"),
    pytest.param({"causal": True, "rotary": "interleaved", "batch_idx": True, "leftpad": True}, id="batch_idx-leftpad"),
    pytest.param({"window_size": (4, 0), "rotary": "interleaved", "leftpad": True}, id="local-rotary-leftpad"),
    pytest.param({"causal": True, "softcap": 3.0, "alibi": True, "page_size": 2, "leftpad": True},
                 id="paged-leftpad-softcap-alibi"),
    pytest.param({"causal": True, "new": 0}, id="no-new-keys"),
    pytest.param({"causal": True, "rotary": "interleaved", "int_seqlens": True, "batch_idx": True}, id="int-seqlens"),
]


def kv_setup(case, device, B=3, L=4, H=4, Hk=2, D=32, rd=16, capacity=20):
    """A cache (contiguous or paged), new keys and the arguments of one call; the logical cache of each sequence
    (B, capacity, Hk, D) before the call, for the oracle."""
    L_new = case.get("new", L)
    if case.get("int_seqlens"):
        cache_seqlens = 7
        seqlens = torch.full((B,), 7, dtype=torch.int32)
    else:
        seqlens = cache_seqlens = torch.randint(3, capacity - L_new + 1, (B,), dtype=torch.int32)
    kw = dict(causal=case.get("causal", False), window_size=case.get("window_size", (-1, -1)),
              softcap=case.get("softcap", 0.0), cache_seqlens=cache_seqlens)
    if case.get("page_size"):
        ps = case["page_size"]
        per_seq = -(-capacity // ps)
        pages = B * per_seq + 2
        k_cache, v_cache = torch.randn(pages, ps, Hk, D), torch.randn(pages, ps, Hk, D)
        kw["block_table"] = torch.randperm(pages)[:B * per_seq].view(B, per_seq).to(torch.int32)
        capacity = per_seq * ps
        table = kw["block_table"].long()  # kw moves to device below; the oracle gathers on the CPU
        logical = lambda c: c[table].flatten(1, 2)  # noqa: E731
    else:
        rows = B + 2 if case.get("batch_idx") else B
        k_cache, v_cache = torch.randn(rows, capacity, Hk, D), torch.randn(rows, capacity, Hk, D)
        if case.get("batch_idx"):
            kw["cache_batch_idx"] = torch.randperm(rows)[:B].to(torch.int32)
        idx = kw.get("cache_batch_idx", torch.arange(B)).long()
        logical = lambda c: c[idx]  # noqa: E731
    if case.get("leftpad"):
        kw["cache_leftpad"] = torch.randint(0, 3, (B,), dtype=torch.int32)
    if case.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, H)
    q = torch.randn(B, L, H, D)
    k, v = (torch.randn(B, L_new, Hk, D), torch.randn(B, L_new, Hk, D)) if L_new else (None, None)
    if case.get("rotary"):
        angle = torch.rand(capacity, rd // 2) * 6.3
        kw.update(rotary_cos=angle.cos(), rotary_sin=angle.sin(), rotary_interleaved=case["rotary"] == "interleaved")
    kw = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    return q, k_cache, v_cache, k, v, kw, seqlens, logical


def ref_kvcache(q, k_cache, v_cache, k, v, kw, seqlens, logical, dtype=None):
    """Rotary on q and k at flash-attn's positions, the append, then ref_attn per sequence on keys
    [cache_leftpad[b], cache_seqlens[b] + L_new) of its logical cache, in float64 (dtype None: the oracle) or in
    dtype (the baseline). -> out, lse, the appended keys (float64)."""
    B, L = q.shape[:2]
    L_new = 0 if k is None else k.shape[1]
    K, V = logical(k_cache).double(), logical(v_cache).double()
    if "rotary_cos" in kw:
        cos, sin, inter = kw["rotary_cos"].cpu(), kw["rotary_sin"].cpu(), kw["rotary_interleaved"]
        pos_k = seqlens.long()[:, None] + torch.arange(L_new)
        local = kw["window_size"] != (-1, -1)
        steps = torch.arange(L) if kw["causal"] or local else torch.zeros(L, dtype=torch.long)  # fixed: all at 0
        pos_q = seqlens.long()[:, None] + steps
        q, k = rope_ref(q, cos, sin, pos_q, inter), rope_ref(k, cos, sin, pos_k, inter)
    for b in range(B):
        n = int(seqlens[b])
        if L_new:
            K[b, n:n + L_new], V[b, n:n + L_new] = k[b].double(), v[b].double()
    outs, lses = [], []
    leftpad = kw.get("cache_leftpad", torch.zeros(B, dtype=torch.int32)).cpu()
    alibi = kw.get("alibi_slopes")
    for b in range(B):
        lo, hi = int(leftpad[b]), int(seqlens[b]) + L_new
        cast = lambda x: x.to(dtype or torch.float64)  # noqa: E731
        out, lse = ref_attn(cast(q[b:b + 1]), cast(K[b:b + 1, lo:hi]), cast(V[b:b + 1, lo:hi]), causal=kw["causal"],
                            window_size=kw["window_size"], softcap=kw["softcap"], upcast=dtype is None,
                            alibi_slopes=None if alibi is None else alibi[b].cpu())
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k


@pytest.mark.parametrize("backend,device", KV_BACKENDS)
@pytest.mark.parametrize("case", KV_CASES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=dtype_id)
def test_flash_attn_with_kvcache(forced, backend, device, case, dtype):
    q, k_cache, v_cache, k, v, kw, seqlens, logical = kv_setup(case, device)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    q, k_cache, v_cache, k, v = map(cast, (q, k_cache, v_cache, k, v))
    for name in ("rotary_cos", "rotary_sin"):
        if name in kw:
            kw[name] = kw[name].to(dtype)
    oracle = ref_kvcache(q.cpu(), k_cache.cpu(), v_cache.cpu(), cast(k), cast(v), kw, seqlens, logical)
    baseline = ref_kvcache(q.cpu(), k_cache.cpu(), v_cache.cpu(), cast(k), cast(v), kw, seqlens, logical, dtype)
    kc, vc = k_cache.to(device), v_cache.to(device)
    new = {} if k is None else {"k": k.to(device), "v": v.to(device)}
    out, lse = flash_attn_with_kvcache(q.to(device), kc, vc, **new, **kw, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_close_to_oracle("out", out.cpu(), baseline[0], oracle[0], dtype)
    assert_close_to_oracle("lse", lse.cpu(), baseline[1], oracle[1], dtype)
    if k is not None:  # the (rotated) new keys were written in place at cache_seqlens[b] ...
        written = logical(kc.cpu())
        for b in range(q.shape[0]):
            n = int(seqlens[b])
            torch.testing.assert_close(written[b, n:n + k.shape[1]].double(), oracle[2][b].double(),
                                       atol=ATOL[dtype] * 10 if dtype != torch.bfloat16 else 3e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# argument errors flash-attn raises: RuntimeError (what flash-attn's checks raise), and ValueError/TypeError

def _kv(**kw):
    q, kc, vc = torch.randn(2, 3, 4, 32), torch.zeros(2, 16, 2, 32), torch.zeros(2, 16, 2, 32)
    k, v = torch.randn(2, 3, 2, 32), torch.randn(2, 3, 2, 32)
    angle = torch.rand(16, 8)
    args = dict(k=k, v=v, rotary_cos=angle.cos(), rotary_sin=angle.sin(), cache_seqlens=4, causal=True)
    args.update(kw)
    return flash_attn_with_kvcache(q, kc, vc, **args), kc


ERRORS = [
    pytest.param(lambda: flash_attn_func(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)),
                 "same headdim", id="headdim-mismatch"),
    pytest.param(lambda: flash_attn_func(torch.randn(1, 4, 6, 16), torch.randn(1, 4, 4, 16),
                                         torch.randn(1, 4, 4, 16)), "must divide", id="heads-do-not-divide"),
    pytest.param(lambda: flash_attn_func(torch.randn(1, 4, 2, 16), torch.randn(1, 5, 2, 16),
                                         torch.randn(1, 4, 2, 16)), "same seqlen", id="k-v-seqlen"),
    pytest.param(lambda: flash_attn_func(torch.randn(4, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)),
                 "4-D", id="rank"),
    pytest.param(lambda: flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16)), "qkv", id="qkv-not-3"),
    pytest.param(lambda: flash_attn_varlen_func(torch.randn(4, 2, 16), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                                                torch.tensor([0, 4], dtype=torch.int32),
                                                torch.tensor([0, 4], dtype=torch.int32), 4, 4),
                 "same headdim", id="varlen-headdim"),
    pytest.param(lambda: flash_attn_varlen_func(torch.randn(4, 2, 16), torch.randn(2, 4, 2, 16),
                                                torch.randn(2, 4, 2, 16), torch.tensor([0, 4], dtype=torch.int32),
                                                torch.tensor([0, 4], dtype=torch.int32), 4, 4, dropout_p=0.1,
                                                block_table=torch.zeros(1, 2, dtype=torch.int32)),
                 "dropout", id="varlen-paged-dropout"),
    pytest.param(lambda: _kv(k=None, v=None), "new key / value", id="rotary-without-k"),
    pytest.param(lambda: _kv(rotary_cos=torch.ones(16, 20), rotary_sin=torch.ones(16, 20)), "headdim",
                 id="rotary_dim>headdim"),
    pytest.param(lambda: _kv(rotary_sin=torch.ones(16, 4)), "rotary_sin", id="cos-sin-shapes"),
    pytest.param(lambda: _kv(rotary_cos=torch.ones(16, 8, dtype=torch.float64)), "dtype", id="cos-dtype"),
    pytest.param(lambda: _kv(cache_seqlens=None), "cache_seqlens", id="k-without-cache_seqlens"),
    pytest.param(lambda: _kv(rotary_cos=torch.ones(5, 8), rotary_sin=torch.ones(5, 8)), "positions",
                 id="cos-too-short"),
    pytest.param(lambda: _kv(cache_seqlens=14, rotary_cos=None, rotary_sin=None), "capacity",
                 id="append-past-the-cache"),
]


@pytest.mark.parametrize("call,words", ERRORS)
def test_argument_errors(call, words):
    with pytest.raises(RuntimeError, match=words) as e:
        call()
    assert isinstance(e.value, (ValueError, TypeError))


def test_bad_call_writes_nothing():
    """A call that raises leaves the cache as it was (flash-attn checks before it launches)."""
    kc = torch.zeros(2, 16, 2, 32)
    for bad in (dict(cache_seqlens=14), dict(rotary_cos=torch.ones(5, 8), rotary_sin=torch.ones(5, 8))):
        args = {"k": torch.randn(2, 3, 2, 32), "v": torch.randn(2, 3, 2, 32), "cache_seqlens": 4, **bad}
        if "rotary_cos" not in args:
            args.update(rotary_cos=torch.ones(16, 8), rotary_sin=torch.zeros(16, 8))
        with pytest.raises(RuntimeError):
            flash_attn_with_kvcache(torch.randn(2, 3, 4, 32), kc, torch.zeros(2, 16, 2, 32), **args)
        assert not kc.any()


def test_kvcache_whole_cache_and_num_splits():
    """cache_seqlens None (no new keys): every cache position is attended; num_splits changes nothing."""
    q, kc, vc = torch.randn(2, 1, 4, 16), torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    out = flash_attn_with_kvcache(q, kc, vc)
    assert torch.equal(out, flash_attn_with_kvcache(q, kc, vc, cache_seqlens=6, num_splits=4))
    torch.testing.assert_close(out.double(), ref_attn(q, kc, vc)[0], atol=1e-5, rtol=1e-5)


def test_outputs_are_contiguous_in_flash_attn_layout():
    """out is contiguous (B, S, H, D) as flash-attn's is, so .view works on it."""
    q, k = torch.randn(2, 10, 4, 16), torch.randn(2, 12, 2, 16)
    out = flash_attn_func(q, k, k, causal=True)
    assert out.is_contiguous() and out.view(2, 10, -1).shape == (2, 10, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 6, 6).is_contiguous()
