"""The CUDA C++ kernels compile with nvcc alone (no GPU, no torch headers) for sm_80 and sm_90a, run on tensor
cores (HMMA in the SASS) and keep everything in registers (no spills).

A representative subset keeps `make test` short: bf16, head dim 128, with and without the window, forward and
backward. `python -m pyattn.inspect --arch sm_80|sm_90 --backend cuda` reports every instantiation."""
import pytest

from pyattn import cuda_aot, inspect

pytestmark = pytest.mark.skipif(cuda_aot.find_nvcc() is None,
                                reason="nvcc is not installed: the CUDA C++ compile checks need the CUDA toolkit")

SUBSET = ("fwd_bf16_d128", "fwd_bf16_d128_causal", "bwd_bf16_d128", "bwd_bf16_d128_causal")
# per-block shared memory an sm_80-path kernel may use: sm_86/sm_89 allow 99 KiB (plus 1 KiB the driver keeps)
MAX_SMEM = {80: 101376, 90: 101376 + 1024}


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def reports(request):
    return request.param, cuda_aot.aot_reports(request.param, SUBSET)


def test_every_kernel_is_reported(reports):
    arch, rs = reports
    names = {r["name"] for r in rs}
    expected = {"cuda_fwd_bf16_d128", "cuda_fwd_bf16_d128_causal", "cuda_bwd_delta_bf16"} | {
        f"cuda_bwd_{k}_bf16_d128{c}" for k in ("dkdv", "dq") for c in ("", "_causal")}
    assert names == expected
    assert all(r["backend"] == "cuda" and r["arch"] == f"sm_{arch}" for r in rs)


def test_tensor_cores_and_no_spills(reports):
    arch, rs = reports
    for r in rs:
        assert r["spill_bytes"] == 0, f"{r['name']} spills {r['spill_bytes']} bytes on sm_{arch}"
        assert r["registers"] <= 255, r
        assert r["shared_bytes"] <= MAX_SMEM[arch], f"{r['name']}: {r['shared_bytes']} bytes of shared memory"
        if "delta" in r["name"]:
            continue  # the prepass is a row reduction: no matmul
        assert r["sass_forms"].get("HMMA.16816.F32.BF16", 0) > 0, f"{r['name']}: no bf16 HMMA: {r['sass_forms']}"


def test_hmma_count_matches_the_tiles(reports):
    """Fully unrolled main loops: the HMMA count follows from tiles.h (fwd d128: 64 keys x 128 dims per step,
    two GEMMs of 8 x 8 m16n8k16 tiles each)."""
    _, rs = reports
    by_name = {r["name"]: r["sass"]["HMMA"] for r in rs if "delta" not in r["name"]}
    assert by_name["cuda_fwd_bf16_d128"] == 2 * (128 // 16) * (64 // 8)
    assert by_name["cuda_bwd_dq_bf16_d128"] == 3 * (128 // 16) * (64 // 8)  # S, dP, dQ
    assert by_name["cuda_bwd_dkdv_bf16_d128"] == 4 * (128 // 16) * (32 // 8)  # S^T, dP^T, dV, dK per 32 queries


def test_inspect_table_lists_cuda_kernels(reports):
    _, rs = reports
    text = inspect.table(rs)
    assert "cuda_fwd_bf16_d128" in text and "HMMA.16816.F32.BF16" in text
