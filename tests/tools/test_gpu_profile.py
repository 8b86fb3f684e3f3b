"""make gpu-profile's driver (benchmarks/gpu_profile.py and its steps) on the CPU: a GPU loan is 15 minutes, too
short to find a typo in a script that only runs there. The plan, the budget, the files and the command lines are
checked here; the GPU measurements run on stand-ins (a CPU profiler run, fake events, the Triton interpreter)."""
import json
import os
import sys
import tarfile
import time
import types

import pytest
import torch

from benchmarks import gpu_profile, profile_steps, profile_tools
from helpers import assert_close_to_oracle

STEP_NAMES = ["env", "kernels", "decode-sweep", "autotune", "ncu", "artifacts", "smoke"]


def _index(out):
    return json.loads((out / gpu_profile.INDEX).read_text())


def test_dry_run_plans_every_step(tmp_path):
    gpu_profile.main(["--out", str(tmp_path), "--dry-run"])
    index = _index(tmp_path)
    assert index["dry_run"] and list(index["steps"]) == STEP_NAMES
    for name, entry in index["steps"].items():
        # in the default budget, steps that all take their whole caps still reach the artifacts
        assert entry["status"] == ("would skip" if name == "smoke" else "planned"), (name, entry)
        assert entry["plan"]["files"], name
    kernels = index["steps"]["kernels"]["plan"]
    # the sweep's B*H at 16k tokens: 262144 tokens = 1 x 16 heads
    assert kernels["attention"][0] == "fwd d64 full B1 H16 L16384" and len(kernels["attention"]) == 8
    assert len(kernels["decode"]) == 2 * 2 * 2 * 2  # batch x length x layout x (eager, graph)
    assert index["steps"]["autotune"]["plan"]["candidates"] > len(profile_steps.WIDE_BWD) // 2
    assert sorted(index["steps"]["ncu"]["plan"]["commands"]) == sorted(profile_tools.KERNELS)
    assert os.listdir(tmp_path) == [gpu_profile.INDEX]


def test_dry_run_budget_skips_the_tail(tmp_path):
    gpu_profile.main(["--out", str(tmp_path), "--dry-run", "--budget", "170"])
    steps = _index(tmp_path)["steps"]
    assert steps["env"]["status"] == "planned" and steps["kernels"]["starts_at_s"] == 150
    assert steps["kernels"]["status"] == "would skip" and "20 s left, the step needs at least 30 s" in \
        steps["kernels"]["reason"]
    # a step that does not fit leaves the time to a shorter one
    assert steps["decode-sweep"]["status"] == "planned" and steps["decode-sweep"]["starts_at_s"] == 150
    assert steps["autotune"]["status"] == "would skip"


@pytest.mark.parametrize("left,cap,expect", [(500, 100, 100), (60, 100, 60), (29, 100, None), (30, 100, 30)],
                         ids=["cap", "budget-left", "too-little", "just-enough"])
def test_allot(left, cap, expect):
    step = gpu_profile.Step("s", cap, 30, None, None)
    deadline, why = gpu_profile.allot(step, 1000.0, 1000.0 + left)
    assert (None if deadline is None else deadline - 1000.0) == expect
    assert (why is None) == (expect is not None)
    assert gpu_profile.allot(step, 1000.0, 1000.0 + left, caps={"s": left})[0] in (None, 1000.0 + left)


def test_no_cuda_skips_every_step_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_profile.main(["--out", str(tmp_path)])
    steps = _index(tmp_path)["steps"]
    assert list(steps) == STEP_NAMES
    assert all(e["status"] == "skipped" and "no CUDA GPU" in e["reason"] for e in steps.values())


def test_steps_run_in_order_under_the_budget(tmp_path, monkeypatch):
    """A fake GPU and steps that each take their whole cap: the tail is skipped for the budget, with the reason."""
    clock = [1000.0]
    monkeypatch.setattr(gpu_profile, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    ran = []

    def fake_run_step(profile, step, deadline, packed):
        ran.append((step.name, deadline - clock[0], packed))
        clock[0] = deadline
        profile.step(step.name, status="done", seconds=deadline)
    monkeypatch.setattr(gpu_profile, "run_step", fake_run_step)
    gpu_profile.main(["--out", str(tmp_path), "--budget", "400", "--steps", "kernels,ncu,smoke"])
    assert ran == [("kernels", 400.0, True)]  # --steps: the steps named share the whole budget
    clock[0] = 1000.0
    ran.clear()
    gpu_profile.main(["--out", str(tmp_path), "--budget", "320"])
    assert [r[0] for r in ran] == ["env", "kernels", "decode-sweep"]
    steps = _index(tmp_path)["steps"]
    assert steps["autotune"]["status"] == "skipped" and "budget" in steps["autotune"]["reason"]


def test_a_later_run_of_some_steps_keeps_the_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gpu_profile, "run_step", lambda profile, step, deadline, packed:
                        profile.step(step.name, status="done", seconds=1))
    gpu_profile.main(["--out", str(tmp_path), "--steps", "kernels"])
    gpu_profile.main(["--out", str(tmp_path), "--steps", "ncu"])
    assert list(_index(tmp_path)["steps"]) == ["kernels", "ncu"]
    gpu_profile.main(["--out", str(tmp_path), "--steps", "ncu", "--dry-run"])
    assert list(_index(tmp_path)["steps"]) == ["ncu"]


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_profile.main(["--out", str(tmp_path), "--steps", "env,profile"])


@pytest.mark.subprocess
def test_a_step_runs_in_its_own_process_and_is_packed(tmp_path, monkeypatch):
    """The artifacts step for real (no CUDA build here, an empty Triton cache): subprocess, summary, archive."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the tree may hold a CUDA build, whose SASS this would dump")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    profile = gpu_profile.Profile(str(tmp_path / "out"), 60, "Fake GPU", False)
    gpu_profile.run_step(profile, gpu_profile.BY_NAME["artifacts"], time.time() + 50, packed=True)
    entry = _index(tmp_path / "out")["steps"]["artifacts"]
    assert entry["status"] == "done", entry
    assert entry["summary"]["triton_files"] == 0 and "no CUDA C++ build" in entry["summary"]["sass"]
    assert {"artifacts.json", "step.log", "summary.json"} <= set(entry["files"])
    assert sorted(os.listdir(tmp_path / "out")) == ["artifacts.tar.gz", gpu_profile.INDEX]
    with tarfile.open(tmp_path / "out" / "artifacts.tar.gz") as tar:
        assert "artifacts/artifacts.json" in tar.getnames()


def test_step_timeout_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_profile.gpu_run, "wait", lambda started, deadline: (124, "cut off\n", time.time()))
    monkeypatch.setattr(gpu_profile.gpu_run, "start", lambda cmd, env=None: None)
    profile = gpu_profile.Profile(str(tmp_path), 60, "Fake GPU", False)
    gpu_profile.run_step(profile, gpu_profile.BY_NAME["kernels"], time.time() + 10, packed=False)
    entry = _index(tmp_path)["steps"]["kernels"]
    assert entry["status"] == "timeout" and entry["reason"] == ["cut off"] and entry["files"] == ["step.log"]


# ------------------------------------------------------------------------------------------ measurement stand-ins

def test_kernel_rows_from_fake_events():
    events = [("_attn_fwd", 30.0), ("_attn_fwd_combine", 4.0), ("_attn_fwd", 34.0), ("_attn_fwd_combine", 4.0),
              ("void at::native::index_elementwise_kernel", 2.0)]
    rows = profile_steps.kernel_rows(events, reps=2)
    assert [(r["kernel"], r["role"]) for r in rows] == [("_attn_fwd", "fwd/split"), ("_attn_fwd_combine", "combine"),
                                                        ("void at::native::index_elementwise_kernel", "other")]
    assert rows[0]["us_per_rep"] == 32.0 and rows[0]["calls_per_rep"] == 1 and rows[2]["us_per_call"] == 2.0


@pytest.mark.parametrize("name,role", [("_attn_bwd_dkdv", "dkdv"), ("_attn_bwd_dq", "dq"),
                                       ("_attn_bwd_preprocess", "delta"),
                                       ("void pyattn::dkdv_kernel<true, 64, false>(AttnBwdParams)", "cuda dkdv"),
                                       ("Memset (Device)", "other")])
def test_role(name, role):
    assert profile_steps.role(name) == role


@pytest.fixture
def on_cpu(monkeypatch):
    """The steps' measurements on the CPU: torch.profiler's CPU operators for its kernels, float32 for bf16."""
    monkeypatch.setattr(profile_steps, "DEVICE", "cpu")
    monkeypatch.setattr(profile_steps, "DTYPE", torch.float32)


def test_profile_and_wall_time_on_the_cpu(on_cpu):
    """The profiler calls of the kernels step against torch's real API (its CPU activities stand in for CUDA's)."""
    a = torch.randn(64, 64)
    names = [n for n, _ in profile_steps.device_events(profile_steps.profile(lambda: a @ a, 3))]
    assert names.count("aten::mm") == 3
    assert profile_steps.wall_us(lambda: a @ a, 3) > 0


def _tiny_points():
    from benchmarks.sweep import Point
    return [Point("pyattn-triton", "fp32", 1, 2, 40, 40, 16, causal, pass_)
            for pass_, causal in (("fwd", True), ("bwd", False))]


def _tiny_decode(B, S, layout, backend="triton"):
    """A decode call the interpreter runs (float32, 4:1 heads, D=16) -> (call, bytes)."""
    import pyattn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, 4, 16, generator=g)
    k_cache, v_cache = (torch.randn(B, S, 1, 16, generator=g) for _ in range(2))
    seqlens = torch.full((B,), S - 8, dtype=torch.int32)
    return (lambda: pyattn.kvcache_attention(q, k_cache, v_cache, cache_seqlens=seqlens, backend=backend)), 1000


def _interpreting():
    from pyattn.kernels import configs
    if not configs.INTERPRET:
        pytest.skip("runs the Triton kernels under the interpreter")


@pytest.mark.triton_interpreter
def test_kernels_step_on_the_cpu(tmp_path, monkeypatch, on_cpu):
    """run_kernels end to end on tiny problems: every record written, the failed CUDA-graph capture recorded."""
    _interpreting()
    monkeypatch.setattr(profile_steps, "attention_points", _tiny_points)
    monkeypatch.setattr(profile_steps, "decode_cases", lambda: [(1, 64, "contiguous")])
    monkeypatch.setattr(profile_steps, "decode_call", _tiny_decode)
    monkeypatch.setattr(profile_steps, "PROFILE_REPS", 4)
    index = {"steps": {"env": {"summary": {"copy_gbps": 10.0}}}}
    summary = profile_steps.run_kernels(gpu_profile.Context(str(tmp_path), "kernels", time.time() + 300, index))
    records = json.loads((tmp_path / "kernels" / "kernels.json").read_text())
    assert [(r["case"], r["mode"]) for r in records][-2:] == [("decode B1 S0k contiguous", "eager"),
                                                              ("decode B1 S0k contiguous", "graph")]
    assert len(records) == 4 and records[0]["tflops_kernel"] and records[2]["copy_fraction_wall"]
    assert summary["cases"] == 4 and summary["graph_capture_errors"] == [records[-1]["capture_error"]]
    cases = (tmp_path / "kernels" / "cases.csv").read_text().splitlines()
    assert cases[0].split(",") == profile_steps.CASE_FIELDS and len(cases) == 5
    assert "aten::" in (tmp_path / "kernels" / "kernels.csv").read_text()


def test_decode_real_problem_builds(on_cpu):
    """decode_call's cache, inputs and call as serving.py builds them (here on the CPU backend)."""
    call, nbytes = profile_steps.decode_call(2, 64, "paged", backend="cpu")
    assert call().shape == (2, 1, 32, 128) and nbytes > 0


@pytest.mark.triton_interpreter
def test_decode_sweep_on_the_cpu(tmp_path, monkeypatch, on_cpu):
    _interpreting()
    monkeypatch.setattr(profile_steps, "decode_cases", lambda: [(1, 96, "contiguous")])
    monkeypatch.setattr(profile_steps, "decode_call", _tiny_decode)
    monkeypatch.setattr(profile_steps, "SWEEP_TILES", (None, (32, 1, 1)))
    monkeypatch.setattr(profile_steps, "SWEEP_SPLITS", (0, 2))
    summary = profile_steps.run_decode_sweep(gpu_profile.Context(str(tmp_path), "decode-sweep", time.time() + 300,
                                                                 {}))
    lines = (tmp_path / "decode-sweep" / "decode-sweep.csv").read_text().splitlines()
    assert summary["points"] == 4 and len(lines) == 5
    # the launcher's own split count (a number), then the forced one; the forced tiles in the last row
    assert lines[1].split(",")[1].isdigit() and lines[2].split(",")[:2] == ["decode B1 S0k contiguous", "2"]
    assert lines[-1].startswith("decode B1 S0k contiguous,2,16,32,1,1,")


@pytest.mark.triton_interpreter
def test_autotune_step_on_the_cpu(tmp_path, monkeypatch, on_cpu):
    """run_autotune with two candidates per kernel and a stand-in timer: each timing named, the tuner put back."""
    import triton
    import triton.testing

    from pyattn.kernels import configs, launch
    _interpreting()
    monkeypatch.setattr(configs, "AUTOTUNE_IN_INTERPRETER", True)
    monkeypatch.setattr(configs, "AUTOTUNE_FROM", 0)
    monkeypatch.setattr(profile_steps, "attention_points", _tiny_points)
    monkeypatch.setattr(profile_steps, "AUTOTUNE_CASES", ((16, False),))
    monkeypatch.setattr(profile_steps, "widened_bwd_configs", lambda: [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn}, num_warps=1, num_stages=1) for bn in (16, 32)])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), [2.0, 1.0, 3.0])[1])
    own = launch._tuned
    summary = profile_steps.run_autotune(gpu_profile.Context(str(tmp_path), "autotune", time.time() + 300, {}))
    assert launch._tuned is own
    assert [(r["kernel"], r["candidates"]) for r in summary["results"]] == [("dkdv", 2), ("dq", 2)]
    rows = (tmp_path / "autotune" / "autotune.csv").read_text().splitlines()
    assert sum(",timed" in r for r in rows) == 4 and sum(",configs_timings" in r for r in rows) == 4


def test_failed_graph_capture_is_recorded_not_raised():
    if torch.cuda.is_available():
        pytest.skip("a GPU captures")
    replay, error = profile_steps.captured(lambda: None)
    assert replay is None and error


def test_case_rates():
    rows = [dict(us_per_rep=80.0), dict(us_per_rep=20.0)]
    rec = profile_steps._case("decode", "eager", rows, wall=300.0, nbytes=400e3, copy_gbps=8.0)
    assert rec["kernel_us"] == 100.0 and rec["wall_over_kernel"] == 3.0
    assert rec["gbps_kernel"] == 4.0 and rec["copy_fraction_kernel"] == 0.5


def test_rows_writes_as_it_goes(tmp_path):
    rows = profile_steps.Rows(str(tmp_path / "t.csv"), ["case", "ms", "note"])
    rows.add(dict(case="a", ms=1.23456, other="dropped"))
    assert (tmp_path / "t.csv").read_text().splitlines() == ["case,ms,note", "a,1.235,"]


def test_ceilings_from_the_index():
    index = {"steps": {"env": {"summary": {"copy_gbps": 4300.0, "bf16_matmul_tflops": 790.0}}}}
    assert profile_steps.ceilings(index) == (4300.0, 790.0) and profile_steps.ceilings({}) == (None, None)


@pytest.mark.triton_interpreter
def test_forced_decode_splits_and_tiles_under_the_interpreter(monkeypatch):
    """The sweep's hook: the split count and tiles it forces reach the launch, and the result stays right."""
    import pyattn
    from pyattn.kernels import configs, launch
    if not configs.INTERPRET:
        pytest.skip("runs the Triton kernels under the interpreter")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, 16, generator=g)
    k_cache, v_cache = (torch.randn(1, 96, 1, 16, generator=g) for _ in range(2))
    seqlens = torch.tensor([90], dtype=torch.int32)

    def call(backend, dtype=torch.float32):
        return pyattn.kvcache_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens=seqlens,
                                        backend=backend, return_lse=True)
    grids = []
    run = launch._run
    monkeypatch.setattr(launch, "_run", lambda kernel, grid, args, **meta: (grids.append(grid),
                                                                            run(kernel, grid, args, **meta)))
    with profile_steps.forced_decode(3, (32, 1, 1)) as chosen:
        ours = call("triton")
    assert chosen == {"splits": 3, "tiles": (16, 32, 1, 1)} and grids[0][1] == 3 and len(grids) == 2  # + combine
    assert launch._Problem.num_splits.__name__ == "num_splits" and configs.decode_tiles.__name__ == "decode_tiles"
    base, oracle = call("reference"), call("reference", torch.float64)
    for name, y, b, o in zip(("out", "lse"), ours, base, oracle):
        assert_close_to_oracle(name, y, b, o, torch.float32)


def test_widened_backward_candidates():
    from pyattn.kernels import configs
    wide = profile_steps.widened_bwd_configs()
    tiles = [configs._tile(c) for c in wide]
    assert len(tiles) == len(set(tiles)) and {configs._tile(c) for c in configs.bwd_autotune_configs()} <= set(tiles)
    assert {st for *_, st in tiles} >= {2, 3, 4, 5} and (64, 64, 4, 3) in tiles
    kept = configs.prune_bwd(wide, {"HEAD_DIM": 128}, cc=90, kernel=configs.DKDV_TILES)
    assert configs.DKDV_TILES[(90, 128)] in [configs._tile(c) for c in kept] and len(kept) < len(wide)


def test_recording_bench_names_each_timing(tmp_path, monkeypatch):
    import triton
    import triton.testing
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), [1.0, 0.9, 1.1])[1])
    rows = profile_steps.Rows(str(tmp_path / "a.csv"), profile_steps.AUTOTUNE_FIELDS)
    cands = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=3) for m in (32, 64)]
    bench = profile_steps.RecordingBench(rows, "bwd", "dq", lambda configs, named_args, **kw: configs[::-1],
                                         time.time() + 60)
    assert bench.prune(cands, {}) == cands[::-1]
    assert bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    bench.deadline = 0
    assert bench(lambda: pytest.fail("run past the deadline")) == float("inf")
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[1].startswith("bwd,dq,64,64,4,3,1,0.9,1.1,,timed") and ",32,64,4,3," in lines[2]
    assert lines[2].endswith("past deadline: not run")


# -------------------------------------------------------------------------------------------------- tools' steps

def test_ncu_command_lines():
    for name, (kernel, _) in profile_tools.KERNELS.items():
        cmd = profile_tools.ncu_command("/cuda/bin/ncu", name, python="python3")
        assert cmd[0] == "/cuda/bin/ncu" and cmd[-3:] == ["benchmarks.gpu_profile", "--kernel-driver", name]
        assert cmd[cmd.index("--kernel-name") + 1] == kernel and cmd[cmd.index("--launch-count") + 1] == "1"
        assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"] == list(profile_tools.NCU_SECTIONS)
        assert cmd[cmd.index("--page") + 1] == "details" and "--csv" in cmd
    assert len(profile_tools.KERNELS) == 6


@pytest.mark.parametrize("name", sorted(profile_tools.KERNELS))
def test_kernel_driver_has_a_problem(name):
    point = profile_tools.driver_point(name)
    assert (point is None) == name.startswith("decode")
    if point is not None:
        assert point.L == 16384 and not point.causal and point.pass_ in ("fwd", "bwd")


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("name", ["dq", "decode-combine"])
def test_kernel_driver_runs_its_call(name, monkeypatch, on_cpu):
    """The ncu drivers' calls on tiny problems: the kernel ncu waits for is launched."""
    from benchmarks.sweep import Point
    from pyattn.kernels import launch
    _interpreting()
    monkeypatch.setattr(profile_steps, "attention_points",
                        lambda: [Point("pyattn-triton", "fp32", 1, 2, 40, 40, 64, False, "bwd")])
    monkeypatch.setattr(profile_steps, "decode_call", _tiny_decode)
    monkeypatch.setattr(profile_tools, "DRIVER_DECODE", (1, 96, "contiguous"))
    launched = []
    run = launch._run
    monkeypatch.setattr(launch, "_run", lambda kernel, grid, args, **meta: (launched.append(kernel.__name__),
                                                                            run(kernel, grid, args, **meta)))
    profile_tools.drive(name)
    assert profile_tools.KERNELS[name][0] in launched


def test_kernel_driver_option_is_parsed(monkeypatch):
    driven = []
    monkeypatch.setattr(profile_tools, "drive", driven.append)
    gpu_profile.main(["--kernel-driver", "dq"])
    assert driven == ["dq"]


@pytest.mark.parametrize("rc,output,status", [
    (0, '==PROF== Connected\n"ID","Kernel Name"\n"0","_attn_bwd_dq"\n', "done"),
    (1, "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters",
     "refused"),
    (0, "==PROF== Connected\n==WARNING== No kernels were profiled.\n", "no kernel profiled"),
    (124, "==PROF== Connected\n", "timeout"),
], ids=["csv", "refused", "no-kernel", "timeout"])
def test_ncu_output(rc, output, status):
    csv_text, log_text = profile_tools.split_ncu_output(output)
    assert all(line.startswith('"') for line in csv_text.splitlines())
    got, reason = profile_tools.ncu_status(rc, csv_text, log_text)
    assert got == status and (reason is None) == (status == "done")
    if status == "refused":
        assert "ERR_NVGPUCTRPERM" in reason


def test_ncu_missing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_tools, "find_ncu", lambda: None)
    ctx = gpu_profile.Context(str(tmp_path), "ncu", time.time() + 30, {})
    assert profile_tools.run_ncu(ctx) == {"all": "missing"}
    assert "no ncu" in json.loads((tmp_path / "ncu" / "ncu.json").read_text())["all"]["reason"]


def _fake_runs(monkeypatch, outputs):
    """gpu_run.start/wait stand-ins in profile_tools: each command gets the next (returncode, output)."""
    ran = []
    monkeypatch.setattr(profile_tools.gpu_run, "start", lambda cmd, env=None: (ran.append((cmd, env)), cmd)[1])
    monkeypatch.setattr(profile_tools.gpu_run, "wait", lambda started, deadline: (*outputs.pop(0), time.time()))
    return ran


def test_ncu_step_writes_each_kernel_and_stops_at_a_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_tools, "find_ncu", lambda: "/cuda/bin/ncu")
    monkeypatch.setattr(profile_tools.gpu_run, "has_cuda_build", lambda: False)
    ran = _fake_runs(monkeypatch, [(0, '==PROF== Connected\n"ID","Kernel Name"\n"0","_attn_bwd_dkdv"\n'),
                                   (1, "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission")])
    ctx = gpu_profile.Context(str(tmp_path), "ncu", time.time() + 300, {})
    got = profile_tools.run_ncu(ctx)
    assert got == {"dkdv": "done", "dq": "refused", "fwd-d128": "skipped", "decode-split": "skipped",
                   "decode-combine": "skipped", "cuda-dkdv": "skipped"}
    assert [cmd[-1] for cmd, _ in ran] == ["dkdv", "dq"]
    assert (tmp_path / "ncu" / "ncu-dkdv.csv").read_text() == '"ID","Kernel Name"\n"0","_attn_bwd_dkdv"\n'
    record = json.loads((tmp_path / "ncu" / "ncu.json").read_text())
    assert "ERR_NVGPUCTRPERM" in record["fwd-d128"]["reason"] and "CUDA C++" in record["cuda-dkdv"]["reason"]


def test_smoke_step_counts_a_cut_off_run(tmp_path, monkeypatch):
    ran = _fake_runs(monkeypatch, [(124, "bringing up nodes...\n..F.s [ 40%]\n")])
    summary = profile_tools.run_smoke(gpu_profile.Context(str(tmp_path), "smoke", time.time() + 60, {}))
    assert (summary["passed"], summary["failed"], summary["skipped"], summary["returncode"]) == (3, 1, 1, 124)
    assert ran[0][1]["PYATTN_FAILURE_LOG"].endswith("test-failures.txt")
    assert json.loads((tmp_path / "smoke" / "smoke.json").read_text())["counted_from"].startswith("progress")


def test_artifacts_step_copies_the_cache_and_the_sass(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "abc"
    cache.mkdir(parents=True)
    (cache / "_attn_fwd.cubin").write_bytes(b"\0" * 10)
    (cache / "_attn_fwd.so").write_bytes(b"\0" * 10)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    tool = tmp_path / "cuobjdump"
    tool.write_text("#!/bin/sh\necho '\tFunction : dkdv_kernel'\necho \"$@\"\n")
    tool.chmod(0o755)
    monkeypatch.setattr(profile_tools, "cuobjdump", lambda: str(tool))
    monkeypatch.setattr(profile_tools, "cuda_sos", lambda: ["/tree/pyattn/_C.so"])
    monkeypatch.setattr(profile_tools.gpu_run, "has_cuda_build", lambda: True)
    summary = profile_tools.run_artifacts(gpu_profile.Context(str(tmp_path / "out"), "artifacts", time.time() + 60,
                                                              {}))
    assert summary["triton_files"] == 1 and "rc 0" in summary["sass"]
    assert (tmp_path / "out" / "artifacts" / "triton-cache" / "abc" / "_attn_fwd.cubin").exists()
    assert "-sass /tree/pyattn/_C.so" in (tmp_path / "out" / "artifacts" / "cuda-sass.txt").read_text()


def test_triton_files_within_the_limit(tmp_path):
    for folder, name, size in (("a", "_attn_fwd.cubin", 300), ("a", "_attn_fwd.ptx", 500), ("b", "x.so", 10),
                               ("b", "_attn_bwd_dq.ttgir", 400)):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"x" * size)
    kept, left = profile_tools.triton_files(str(tmp_path), limit=750)
    assert [os.path.basename(p) for p, _ in kept] == ["_attn_fwd.cubin", "_attn_bwd_dq.ttgir"]
    assert [os.path.basename(p) for p, _ in left] == ["_attn_fwd.ptx"]


def test_sass_sections_keep_the_profiled_kernels():
    text = "".join(f"\n\tFunction : {name}\n" + "x" * 100 for name in ("dkdv_kernel", "delta_kernel", "fwd_kernel"))
    assert profile_tools.sass_sections(text)[0] == text
    kept, note = profile_tools.sass_sections(text, limit=250)
    assert "dkdv_kernel" in kept and "fwd_kernel" in kept and "delta_kernel" not in kept and note


def test_smoke_command_names_existing_tests():
    cmd = profile_tools.smoke_command(python="python3")
    assert cmd[:3] == ["python3", "-m", "pytest"] and cmd[cmd.index("-k") + 1] == profile_tools.SMOKE_K
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert all(os.path.exists(os.path.join(root, t)) for t in profile_tools.SMOKE_TESTS)


def test_help_runs_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        gpu_profile.main(["--help"])
    assert "--dry-run" in capsys.readouterr().out and sys.executable
