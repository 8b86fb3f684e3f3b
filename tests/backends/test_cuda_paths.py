"""On an H100 (sm_90), the TMA + wgmma forward against the sm_80 mma.sync forward of the same build, and both
against the reference: PYATTN_CUDA_SM90=0 selects the sm_80 path. Skipped elsewhere."""
import pytest
import torch

import pyattn
from helpers import assert_close_to_oracle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(autouse=True)
def _sm90_build():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the TMA + wgmma forward runs on sm_90 only")
    if "cuda" not in pyattn.available_backends():
        pytest.fail("a CUDA machine must build the cuda backend (make gpu-check builds it)", pytrace=False)
    if "9.0a" not in pyattn.build_info()["cuda_archs"]:  # else both runs below take the sm_80 path
        pytest.fail(f"built for {pyattn.build_info()['cuda_archs']!r}, without sm_90a", pytrace=False)


def run(monkeypatch, sm90, q, k, v, **kw):
    monkeypatch.setenv("PYATTN_CUDA_SM90", "1" if sm90 else "0")
    return pyattn.scaled_dot_product_attention(q, k, v, backend="cuda", return_lse=True, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"is_causal": True, "causal_alignment": "bottom_right"},
                                {"window_size": (40, 8), "softcap": 10.0}], ids=str)
@pytest.mark.parametrize("L,S,E,Ev", [(300, 257, 128, 128), (129, 1000, 96, 128), (1, 77, 128, 64)], ids=str)
def test_sm90_forward_matches_sm80(monkeypatch, dtype, kw, L, S, E, Ev):
    q = torch.randn(2, 4, L, E, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, S, E, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, S, Ev, device="cuda", dtype=dtype)
    out90, lse90 = run(monkeypatch, True, q, k, v, enable_gqa=True, **kw)
    out80, lse80 = run(monkeypatch, False, q, k, v, enable_gqa=True, **kw)
    args = dict(return_lse=True, enable_gqa=True, **kw)
    oracle, oracle_lse = pyattn.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                              backend="reference", **args)
    base, base_lse = pyattn.scaled_dot_product_attention(q, k, v, backend="reference", **args)  # same dtype
    for path, out, lse in (("sm_90a", out90, lse90), ("sm_80", out80, lse80)):  # helpers' rule for both
        assert_close_to_oracle(f"{path} out", out, base, oracle, dtype)
        assert_close_to_oracle(f"{path} lse", lse, base_lse, oracle_lse, dtype)
