"""Every Triton kernel variant compiles ahead of time for sm_80 and sm_90 without a GPU (pyattn.inspect):
no register spills, tensor cores in every fwd/bwd matmul kernel, wgmma (HGMMA) and TMA in the Hopper
forward, and software-pipelined (cp.async) loads elsewhere."""
import json

import pytest

from pyattn import inspect

pytestmark = pytest.mark.compiles

ARCHS = ["sm_80", "sm_90"]


@pytest.fixture(scope="module", params=ARCHS)
def reports(request):
    return request.param, inspect.kernel_reports(request.param, ("triton",))


def test_reports_have_the_contract_fields(reports):
    arch, rows = reports
    assert rows, "no kernels reported"
    for r in rows:
        assert {"name", "backend", "arch", "registers", "spill_bytes", "shared_bytes", "sass"} <= set(r), r
        assert r["backend"] == "triton" and r["arch"] == arch
        assert "fwd" in r["name"] or "bwd" in r["name"], r["name"]
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0, r


def test_no_spills(reports):
    _, rows = reports
    spilled = {r["name"]: r["spill_bytes"] for r in rows if r["spill_bytes"]}
    assert not spilled, f"kernels with register spills (bytes per thread): {spilled}"


def test_tensor_cores(reports):
    """Matmul kernels use tensor cores; on sm_90 wgmma (HGMMA) in every forward and, up to d128, backward
    (decoding's 16-row tiles are below wgmma's 64); the elementwise kernels use none."""
    arch, rows = reports
    for r in rows:
        if "combine" in r["name"] or "preprocess" in r["name"]:
            continue
        assert r["sass"].get("HMMA", 0) + r["sass"].get("HGMMA", 0) > 0, r
        wgmma = r["name"].startswith("fwd_") or "d256" not in r["name"]
        if arch == "sm_90" and wgmma and "decode" not in r["name"]:
            assert r["sass"].get("HGMMA", 0) > 0, f"{r['name']} on sm_90 does not use wgmma: {r['sass_forms']}"


def test_loads_are_asynchronous(reports):
    """The loops' K/V (forward) and Q/dO (backward) tiles stream in asynchronously: TMA in the sm_90 forwards
    (decoding's split-KV one included), cp.async (LDGSTS, software pipelining) everywhere else, paged KV caches
    included (their rows are gathered page by page, not one TMA box), and the head-dim-chunked kernels (chunks by
    pointer loads)."""
    arch, rows = reports
    for r in rows:
        if "combine" in r["name"] or "preprocess" in r["name"]:
            continue
        by_pointers = "paged" in r["name"] or "chunked" in r["name"]
        op = "UTMALDG" if arch == "sm_90" and r["name"].startswith("fwd_") and not by_pointers else "LDGSTS"
        assert r["async_copies"].get(op, 0) > 0, f"{r['name']} on {arch}: no {op} ({r['async_copies']})"


def test_cli_json(capsys):
    assert inspect.main(["--arch", "sm_80", "--backend", "triton", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["arch"] == "sm_80" for r in rows)


def test_bad_arch():
    with pytest.raises(ValueError, match="sm_75"):
        inspect.kernel_reports("sm_75")
