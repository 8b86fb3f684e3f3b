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


def test_steps_record_counts_and_kill_at_the_deadline(tmp_path):
    """Steps run at once; pytest's counts land in the record; a step past the deadline is killed (124) with the
    output it had, and the others keep their own results."""
    check = gpu_check.Check(str(tmp_path), "Fake GPU", budget_s=60)
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    counted = [sys.executable, "-c", "print('3 failed, 40 passed, 2 skipped in 1.0s')"]
    results = check.steps("tests", {"tests-slow": slow, "tests-counted": counted}, deadline=time.time() + 8)
    assert results["tests-slow"][0] == 124 and "started" in results["tests-slow"][1]
    assert results["tests-counted"][0] == 0
    record = json.loads((tmp_path / "gpu-check.json").read_text())
    counted_step = record["stages"]["tests"]["tests-counted"]
    assert {k: counted_step[k] for k in ("returncode", "passed", "failed", "skipped")} == \
        {"returncode": 0, "passed": 40, "failed": 3, "skipped": 2}
    assert record["tests"] == {"passed": 40, "failed": 3, "skipped": 2}
    assert "== tests/tests-slow rc=124" in (tmp_path / "gpu-check.log").read_text()
