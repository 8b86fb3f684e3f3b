"""The CUDA C++ kernels compile with nvcc alone (no GPU, no torch headers) for sm_80 and sm_90a, run on tensor
cores (HMMA in the SASS) and keep everything in registers (no spills).

A representative subset keeps `make test` short: bf16, head dim 128, with and without the window, forward and
backward on the sm_80 path (mma.sync: HMMA), and on sm_90a also the TMA + wgmma forward (HGMMA). The forward's
KV-cache mode (kvcache_fwd, contiguous or paged) and its sinks are runtime branches of the same kernels: no
instantiation of their own. `python -m pyattn.inspect --arch sm_80|sm_90 --backend cuda` reports every instantiation."""
import pytest

from pyattn import cuda_aot, inspect

pytestmark = [pytest.mark.compiles,
              pytest.mark.skipif(cuda_aot.find_nvcc() is None,
                                 reason="nvcc is not installed: the CUDA C++ compile checks need the CUDA toolkit")]

SUBSET = ("fwd_bf16_d128", "fwd_bf16_d128_causal", "bwd_bf16_d128", "bwd_bf16_d128_causal")
SM90 = ("fwd_sm90_bf16_d128", "fwd_sm90_bf16_d128_causal")
# per-block shared memory a kernel may use: the sm_80 path also serves sm_86/sm_89 (99 KiB; sm_90 reports
# 1 KiB more, the part the driver keeps); the sm_90a forward has H100's 227 KiB
MAX_SMEM = {80: 101376, 90: 101376 + 1024}
MAX_SMEM_SM90 = 232448


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def reports(request):
    return request.param, cuda_aot.aot_reports(request.param, SUBSET + (SM90 if request.param == 90 else ()))


def test_every_kernel_is_reported(reports):
    arch, rs = reports
    names = {r["name"] for r in rs}
    expected = {"cuda_fwd_bf16_d128", "cuda_fwd_bf16_d128_causal", "cuda_bwd_delta_bf16"} | {
        f"cuda_bwd_{k}_bf16_d128{c}" for k in ("dkdv", "dq") for c in ("", "_causal")}
    if arch == 90:
        expected |= {"cuda_fwd_sm90_bf16_d128", "cuda_fwd_sm90_bf16_d128_causal"}
    assert names == expected
    assert all(r["backend"] == "cuda" and r["arch"] == f"sm_{arch}" for r in rs)


def test_tensor_cores_and_no_spills(reports):
    arch, rs = reports
    for r in rs:
        assert r["spill_bytes"] == 0, f"{r['name']} spills {r['spill_bytes']} bytes on sm_{arch}"
        assert r["registers"] <= 255, r
        limit = MAX_SMEM_SM90 if "sm90" in r["name"] else MAX_SMEM[arch]
        assert r["shared_bytes"] <= limit, f"{r['name']}: {r['shared_bytes']} bytes of shared memory"
        if "delta" in r["name"]:
            continue  # the prepass is a row reduction: no matmul
        form = "HGMMA.64x128x16.F32.BF16" if "sm90" in r["name"] else "HMMA.16816.F32.BF16"
        assert r["sass_forms"].get(form, 0) > 0, f"{r['name']}: no {form}: {r['sass_forms']}"


def test_hmma_count_matches_the_tiles(reports):
    """Fully unrolled main loops: the HMMA count follows from tiles.h (fwd d128: 64 keys x 128 dims per step,
    two GEMMs of 8 x 8 m16n8k16 tiles each)."""
    _, rs = reports
    by_name = {r["name"]: r["sass"].get("HMMA") for r in rs if "delta" not in r["name"]}
    assert by_name["cuda_fwd_bf16_d128"] == 2 * (128 // 16) * (64 // 8)
    assert by_name["cuda_bwd_dq_bf16_d128"] == 3 * (128 // 16) * (64 // 8)  # S, dP, dQ
    assert by_name["cuda_bwd_dkdv_bf16_d128"] == 4 * (128 // 16) * (32 // 8)  # S^T, dP^T, dV, dK per 32 queries


def test_sm90_forward_uses_wgmma(reports):
    """The sm_90a forward: one m64n128k16 wgmma per k16 step, Q K^T over 128 dims and P V over 128 keys."""
    arch, rs = reports
    if arch != 90:
        pytest.skip("wgmma is sm_90a only")
    for r in (r for r in rs if "sm90" in r["name"]):
        assert r["sass_forms"] == {"HGMMA.64x128x16.F32.BF16": 2 * 128 // 16}, r["sass_forms"]
        assert "HMMA" not in r["sass"], r["sass"]


def test_inspect_table_lists_cuda_kernels(reports):
    _, rs = reports
    text = inspect.table(rs)
    assert "cuda_fwd_bf16_d128" in text and "HMMA.16816.F32.BF16" in text
