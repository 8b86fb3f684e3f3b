"""Head dims above 256 in the Triton kernels (taken in chunks, kernels/configs.py), and E != Ev: forward and backward
against the float64 oracle under the interpreter, one case per feature (paged decode: test_triton_kvcache.py)."""
import pytest
import torch

import pyattn
from helpers.backends import backend_device, backend_params, on_device, sdpa_on
from helpers.tolerance import check_fwd_bwd

TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention
triton_only = pytest.mark.parametrize("backend,device", backend_params(("triton",)))


def _tensors(hq, hkv, L, S, E, Ev, mask=False):
    g = torch.Generator().manual_seed(0)
    t = dict(q=torch.randn(1, hq, L, E, generator=g, dtype=torch.float64),
             k=torch.randn(1, hkv, S, E, generator=g, dtype=torch.float64),
             v=torch.randn(1, hkv, S, Ev, generator=g, dtype=torch.float64))
    if mask:
        t["attn_mask"] = torch.randn(1, 1, L, S, generator=g, dtype=torch.float64)
    return t


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("E,Ev,kw,hkv,mask", [
    pytest.param(576, 512, dict(is_causal=True, enable_gqa=True), 1, False, id="E576-Ev512-causal-gqa"),
    pytest.param(512, 512, {}, 2, True, id="E512-Ev512-float-mask"),
    pytest.param(192, 128, dict(is_causal=True), 2, False, id="E192-Ev128-causal"),
])
def test_large_head_dims(backend, device, dtype, E, Ev, kw, hkv, mask):
    t = _tensors(2, hkv, 17, 24, E, Ev, mask)
    def call(sdpa):
        return lambda q, k, v, attn_mask=None: sdpa(q, k, v, attn_mask=attn_mask, **kw)
    check_fwd_bwd(call(sdpa_on(backend)), call(TORCH_SDPA), call(TORCH_SDPA), t, dtype)


def _per_sequence(sdpa, q, k, v, cu_q, cu_k, **kw):
    """Packed (total, H, E) varlen attention as one dense call per sequence."""
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (x[cu[i]:cu[i + 1]].transpose(0, 1) for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        outs.append(sdpa(qs, ks, vs, **kw).transpose(0, 1))
    return torch.cat(outs)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_large_head_dims_varlen(backend, device, dtype):
    lens_q, lens_k = (5, 12), (9, 20)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lens_q, lens_k))
    g = torch.Generator().manual_seed(0)
    t = dict(q=torch.randn(sum(lens_q), 2, 576, generator=g, dtype=torch.float64),
             k=torch.randn(sum(lens_k), 1, 576, generator=g, dtype=torch.float64),
             v=torch.randn(sum(lens_k), 1, 512, generator=g, dtype=torch.float64))

    def ours(q, k, v):
        return pyattn.varlen_attention(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max(lens_q), max(lens_k), is_causal=True,
                           backend=backend)

    def torch_math(q, k, v):
        return _per_sequence(TORCH_SDPA, q, k, v, cu_q.tolist(), cu_k.tolist(), is_causal=True, enable_gqa=True)
    check_fwd_bwd(on_device(ours, backend_device(backend)), torch_math, torch_math, t, dtype)
