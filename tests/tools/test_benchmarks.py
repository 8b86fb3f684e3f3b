"""The benchmark CLI end to end on a tiny sweep: records, table and plots are written and hold up."""
import json
import subprocess
import sys

import pytest
import torch


def run_benchmarks(*args):
    """python -m benchmarks with args, in a child process as a user runs it; fails the test on its failure."""
    res = subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("preset", ["default", "decode"])
@pytest.mark.subprocess
def test_benchmark_cli_writes_records(tmp_path, preset):
    args = ["--device", "cpu", "--preset", preset, "--impl", "naive", "torch-sdpa", "pyattn-cpu", "--dtype", "fp32",
            "--out", str(tmp_path)]
    args += ["--seqlens", "64", "128", "--pass", "fwd", "fwd+bwd"] if preset == "default" else \
        ["--decode-seqlens", "256"]
    run_benchmarks(*args)
    stem = "sweep" if preset == "default" else "decode"
    records = json.loads((tmp_path / f"{stem}.json").read_text())["records"]
    assert {r["impl"] for r in records} == {"naive", "torch-sdpa", "pyattn-cpu"}
    fields = {"impl", "backend", "device", "dtype", "B", "H", "L", "S", "D", "causal", "pass", "ms", "tflops",
              "peak_mem_bytes", "status", "note"}
    for r in records:
        assert fields <= set(r), sorted(fields - set(r))
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0
    assert "| pyattn-cpu |" in (tmp_path / f"{stem}.md").read_text()
    if preset == "default":
        assert (tmp_path / "sweep.png").stat().st_size > 0
        assert any(r["peak_mem_bytes"] for r in records)  # measured in a child process
    else:
        assert all(r["gbps"] > 0 for r in records)


@pytest.mark.subprocess
def test_context_parallel_preset_writes_records(tmp_path):
    """--preset context-parallel: ring attention over 1, 2 and 4 gloo processes, one record per (N, P), each
    checked against float64 math, with per-rank time, memory and traffic, a table and a plot."""
    args = ["--preset", "context-parallel", "--seqlens", "256", "512", "--out", str(tmp_path)]
    run_benchmarks(*args)
    records = json.loads((tmp_path / "context-parallel.json").read_text())["records"]
    assert sorted((r["L"], r["P"]) for r in records) == [(n, p) for n in (256, 512) for p in (1, 2, 4)]
    for r in records:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["peak_mem_bytes"] >= 0 and len(r["rank_ms"]) == r["P"]
        # each rank sends the other P - 1 ranks' worth of K/V once: 2 tensors of (B, H, N/P, D) float32
        assert r["bytes_sent"] == (r["P"] - 1) * 2 * r["B"] * r["H"] * r["N_per_rank"] * r["D"] * 4
        if r["P"] > 1:  # the ranks' blocks compute the causal pairs between them, zigzag: in equal shares
            assert sum(r["rank_work_pairs"]) == r["B"] * r["H"] * r["L"] * (r["L"] + 1) // 2
            assert r["work_balance"] == 1.0
    assert "| 512 | 4 | 128 |" in (tmp_path / "context-parallel.md").read_text()
    assert (tmp_path / "context-parallel.png").stat().st_size > 0


@pytest.mark.subprocess
def test_serving_preset_writes_records(tmp_path):
    """--preset serving at tiny sizes: decode over contiguous and paged caches, batch 1 and 16, every impl
    checked and timed; prefill chunks (512) longer than the caches are recorded as skipped with the reason."""
    args = ["--preset", "serving", "--seqlens", "64", "128", "--out", str(tmp_path)]
    run_benchmarks(*args)
    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["meta"]["copy_gbps"] > 0
    records = data["records"]
    decode = [r for r in records if r["workload"] == "decode"]
    assert {(r["impl"], r["layout"], r["B"], r["S"]) for r in decode} == {
        (i, lay, b, s) for i in ("pyattn-cpu", "torch-sdpa", "naive") for lay in ("contiguous", "paged")
        for b in (1, 16) for s in (64, 128)}
    for r in decode:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bandwidth_fraction"] > 0
        assert ("x_contiguous" in r) == (r["layout"] == "paged")  # both layouts fit together: same rounds
        if r["layout"] == "paged":
            contiguous = next(c for c in decode if c["layout"] == "contiguous" and c["impl"] == r["impl"]
                              and c["B"] == r["B"] and c["S"] == r["S"])
            assert r["x_contiguous"] == pytest.approx(contiguous["ms"] / r["ms"])
    assert all(r["status"] == "skipped" and "longer than" in r["note"] for r in records if r["workload"] == "prefill")
    assert "| decode | 16 | 128 (64..128) | paged | pyattn-cpu |" in (tmp_path / "serving.md").read_text()


def test_serving_times_layouts_apart_where_both_caches_do_not_fit(monkeypatch):
    """Where one cache fits but not both, the layouts are timed one after the other, and paged records carry no
    same-rounds ratio; where both fit, they do."""
    from benchmarks import measure, serving

    small, large = (serving.lengths_for(b, 64) for b in serving.BATCHES)
    one = max(serving.cache_bytes(lay, large) for lay in serving.LAYOUTS)
    assert 2 * max(serving.cache_bytes(lay, small) for lay in serving.LAYOUTS) < one
    monkeypatch.setattr(measure, "available_bytes", lambda device: 1.5 * one / 0.7)  # one large cache, not two
    src = torch.ones(1024)
    records = serving.measure_points([64], ["pyattn-cpu"], 3.0, 600, (src, torch.empty_like(src), 1.0), log=print)
    paged = {r["B"]: r for r in records if r["layout"] == "paged" and r["workload"] == "decode"}
    assert all(r["status"] == "ok" for r in paged.values())
    assert "x_contiguous" in paged[1] and "x_contiguous" not in paged[16]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quick_has_a_long_point_past_naives_memory_wall(device, monkeypatch):
    """--quick ends on one long causal point for every impl; where naive's L x S scores cannot fit, its record is
    skipped with the predicted size while the fused kernels' fit easily (the suite's point, in a quick run)."""
    from benchmarks import measure, sweep

    impls = ["naive", "pyattn-cpu"]
    points = sweep.default_points(device, impls, quick=True)
    long_points = [p for p in points if p.L == sweep.LONG_N]
    assert [p.impl for p in long_points] == impls and all(p.causal and p.S == p.L for p in long_points)
    assert not any(p.L == sweep.LONG_N for p in sweep.default_points(device, impls, quick=True, seqlens=[512]))
    monkeypatch.setattr(measure, "available_bytes", lambda device: 24 * 2**30)  # this dev machine's 24 GB
    naive, fused = long_points
    wall = sweep.memory_wall(naive, device, "reference")
    assert wall["status"] == "skipped" and "does not fit" in wall["note"] and wall["peak_mem_bytes"] > 24 * 2**30
    assert sweep.memory_wall(fused, device, "cpu") is None
