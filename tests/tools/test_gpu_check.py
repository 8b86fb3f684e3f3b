"""make gpu-check's driver (benchmarks/gpu_check.py) on the CPU: a GPU loan is too short to find its bugs there.
The stages themselves need a GPU; here they are stand-ins, and the steps run small commands."""
import json
import sys
import time

import pytest
import torch

from benchmarks import gpu_check


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A visible 'GPU' and stand-in stages that record how they were called -> (run(stage_arg), calls)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gpu_check, "STAGE_CAP_S", dict(gpu_check.STAGE_CAP_S))
    calls = []
    for name in gpu_check.STAGES:
        monkeypatch.setattr(gpu_check, f"stage_{name}",
                            lambda check, arg=None, _n=name: calls.append(_n + (f":{arg}" if arg else "")))

    def run(stage=None):
        argv = ["gpu_check", "--out", str(tmp_path)] + (["--stage", stage] if stage else [])
        monkeypatch.setattr(sys, "argv", argv)
        gpu_check.main()
        return json.loads((tmp_path / "gpu-check.json").read_text())
    return run, calls


@pytest.mark.parametrize("stage,expected", [
    (None, list(gpu_check.STAGES)),
    ("triton", ["build", "bench", "tests:triton"]),
    ("cuda", ["build", "tests:cuda", "sanitizer"]),
    ("sweep", ["serving", "sweep"]),
    ("triton,cuda", ["build", "bench", "tests:triton", "tests:cuda", "sanitizer"]),
    ("build,tests", ["build", "tests"]),
], ids=lambda x: str(x))
def test_stages_and_groups_run_in_order(fake_gpu, stage, expected):
    run, calls = fake_gpu
    record = run(stage)
    assert calls == expected and record["device"] == "Fake GPU"


@pytest.mark.parametrize("stage", ["bogus", "tests:cpu"])
def test_unknown_stage_is_refused(fake_gpu, stage):
    run, calls = fake_gpu
    with pytest.raises(SystemExit, match="unknown stage"):
        run(stage)
    assert calls == []


CUT_OFF_TESTS = """
import time
import pytest

@pytest.mark.parametrize("i", range(5))
def test_passes(i):
    pass

def test_fails():
    assert False

def test_skips():
    pytest.skip("skipped")

def test_hangs_past_the_deadline():
    time.sleep(120)
"""


@pytest.mark.subprocess
def test_steps_record_counts_and_kill_at_the_deadline(tmp_path):
    """Steps run at once; a finished run's counts come from pytest's summary line; a pytest run past the deadline
    is killed (124) with the output it had, and its counts come from the progress marks of the tests that ended."""
    check = gpu_check.Check(str(tmp_path), "Fake GPU", budget_s=60)
    (tmp_path / "test_cut_off.py").write_text(CUT_OFF_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's options and conftest
    cut_off = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
               str(tmp_path / "test_cut_off.py")]
    finished = [sys.executable, "-c", "print('3 failed, 40 passed, 2 skipped in 1.0s')"]
    results = check.steps("tests", {"tests-cut-off": cut_off, "tests-finished": finished},
                          deadline=time.time() + 10)
    assert results["tests-cut-off"][0] == 124 and ".....Fs" in results["tests-cut-off"][1]
    assert results["tests-finished"][0] == 0
    record = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = record["stages"]["tests"]
    fields = ("returncode", "passed", "failed", "skipped")
    counted = {name: {k: step[k] for k in fields} for name, step in steps.items()}
    assert counted == {"tests-finished": {"returncode": 0, "passed": 40, "failed": 3, "skipped": 2},
                       "tests-cut-off": {"returncode": 124, "passed": 5, "failed": 1, "skipped": 1}}
    assert steps["tests-finished"]["counted_from"] == "summary line"
    assert steps["tests-cut-off"]["counted_from"].startswith("progress marks")
    assert record["tests"] == {"passed": 45, "failed": 4, "skipped": 3}
    assert "== tests/tests-cut-off rc=124" in (tmp_path / "gpu-check.log").read_text()


@pytest.mark.parametrize("output,counts", [
    ("..F [100%]\nFAILED t.py::f\n1 failed, 2 passed, 1 error, 1 xfailed in 3.10s\n", (2, 2, 0)),
    ("==== 2 errors in 1.2s ====", (0, 2, 0)),
    ("bringing up nodes...\n\nFF..sx [ 10%]\n.E.\n", (4, 3, 1)),
    ("running build_ext\n[3/41] g++ ... -O3 ...\n", (0, 0, 0)),
], ids=["summary", "collection-errors", "xdist-progress-cut-off", "no-pytest-output"])
def test_counts(output, counts):
    got = gpu_check._counts(output)
    assert (got["passed"], got["failed"], got["skipped"]) == counts
