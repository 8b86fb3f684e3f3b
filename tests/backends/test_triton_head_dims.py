"""Head dims above 256 in the Triton kernels (taken in chunks, kernels/configs.py), and E != Ev: forward and backward
against the float64 oracle under the interpreter, one case per feature."""
import pytest
import torch

from helpers.tolerance import check_fwd_bwd
from helpers.backends import sdpa_on, backend_params

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
