"""make gpu-check [STAGE=name] [BUDGET=seconds]: on a GPU machine, offline, with its system python3.

A GPU loan is short (15 minutes of device time with its cold start, 10 minutes a command) and may be cut off, so
one command runs every stage under one time budget (default 540 s), in order of value per minute, and rewrites
gpu-check.json ({commit, date, device, torch, triton, cuda, tests, stages}) after every step, beside the benchmark
records in benchmarks/results/<gpu>/ (or --out DIR); gpu-check.log holds every step's output.
  build      one build_ext --inplace: the CUDA C++ kernels for this GPU's arch alone (nvcc takes 2-3 s a kernel
             file, so a separate CPU-only build first would cost more than it saves) and the CPU kernel for this
             host's best capability alone; if the CUDA build fails, a CPU-only build, so the Triton checks still run
  bench      the benchmark points docs/gpu-check.md's GPU targets name (bf16, 4k and 16k): Triton, CUDA C++, torch's
             flash and cuDNN SDPA
  tests      the Triton backend's tests and the CUDA C++ backend's tests, both at once (pytest-xdist where it
             is installed: Triton's JIT compiles are CPU-bound); a run cut off at the deadline is counted from
             the progress marks of the tests that ended
  serving    kvcache_attention decode and chunked prefill at 32k and 128k (the serving target: decode at >= 85%
             of the copy bandwidth), Triton and CUDA C++ against torch's SDPA on gathered pages
  sanitizer  compute-sanitizer memcheck and racecheck over benchmarks.sanitize (the CUDA C++ backend)
  sweep      the rest of the GPU benchmark sweep (--quick), up to the time left
Each stage also runs alone or with others (STAGE=name or STAGE=build,tests: a loan after one that recorded the
benchmarks can give all of its time to the tests; tests:triton or tests:cuda runs one backend's tests; tests,
bench and sanitizer need a build in this tree); a later stage keeps the records of earlier ones already in
gpu-check.json. With STAGE given, a stage's cap gives way to the budget: only the stages named share it. STAGE
also takes the groups of the earlier design: triton (build, bench, tests:triton), cuda (build, tests:cuda,
sanitizer) and sweep (serving and the quick sweep).
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import sys
import time

from .gpu_run import ROOT, commit as _commit, has_cuda_build as _has_cuda_build, pytest_counts as _counts, \
    start as _start, wait as _wait

STAGES = ("build", "bench", "tests", "serving", "sanitizer", "sweep")
GROUPS = {"triton": ["build", "bench", "tests:triton"], "cuda": ["build", "tests:cuda", "sanitizer"],
          "sweep": ["serving", "sweep"]}
# the most seconds each stage may take; the sweep gets what is left of the budget
# (the first H200 run, 2026-11-30: build 63 s, the CUDA tests ~210 s, Triton's JIT-bound tests ~30% in 200 s);
# the target points come before the tests so that a record exists within ~3 minutes of a cold start
STAGE_CAP_S = {"build": 240, "tests": 250, "bench": 90, "serving": 55, "sanitizer": 45}
TARGET_BENCH = ["--dtype", "bf16", "--seqlens", "4096", "16384"]
TARGET_IMPLS = ["pyattn-triton", "pyattn-cuda", "torch-sdpa-flash", "torch-sdpa-cudnn"]
SERVING_BENCH = ["--preset", "serving", "--seqlens", "32768", "131072", "--max-call-seconds", "1"]
LOG_CHARS = 2_000_000  # per step: whole pytest failure reports, still far below what a loan can bring back


def best_cpu_capability():
    """This host's best CPU capability (setup.py's names): the only CPU kernel build the GPU checks need."""
    import torch
    if os.uname().machine != "x86_64":
        return "default"
    if torch.cpu._is_avx512_supported():
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    return "avx2" if torch.cpu._is_avx2_supported() else "default"


class Check:
    """gpu-check.json and gpu-check.log in out_dir, written again after every step; the budget's deadline."""

    def __init__(self, out_dir, gpu, budget_s):
        import torch
        self.end = time.time() + budget_s
        self.out_dir = out_dir
        self.json_path = os.path.join(out_dir, "gpu-check.json")
        self.log = open(os.path.join(out_dir, "gpu-check.log"), "a")
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        previous = {}
        if os.path.exists(self.json_path):
            with open(self.json_path) as f:
                previous = json.load(f)
        same = previous.get("commit") == _commit() and previous.get("device") == gpu
        self.record = dict(commit=_commit(), device=gpu, torch=torch.__version__, triton=triton_version,
                           cuda=torch.version.cuda, tests={"passed": 0, "failed": 0, "skipped": 0},
                           stages=previous.get("stages", {}) if same else {})

    def deadline(self, cap_s=None):
        return min(self.end, time.time() + cap_s) if cap_s else self.end

    def steps(self, stage, named_cmds, deadline, env=None):
        """Runs {name: cmd} at once, each until deadline; records and logs each; -> {name: (rc, output, end)}."""
        t0 = time.time()
        procs = {name: _start(cmd, env) for name, cmd in named_cmds.items()}
        results = {name: _wait(proc, deadline) for name, proc in procs.items()}
        for name, (rc, out, ended) in results.items():
            dt = ended - t0
            self.log.write(f"== {stage}/{name} rc={rc} {dt:.0f}s: {' '.join(named_cmds[name])}\n{out[-LOG_CHARS:]}\n")
            entry = self.record["stages"].setdefault(stage, {})
            entry[name] = {"returncode": rc, "seconds": round(dt)}  # 0 ok, 124 out of time, else failed
            if name.startswith("tests"):
                entry[name].update(_counts(out))
        self.log.flush()
        self.save()
        return results

    def save(self):
        tests = {"passed": 0, "failed": 0, "skipped": 0}
        for stage in self.record["stages"].values():
            for step in stage.values():
                for k in tests:
                    tests[k] += step.get(k, 0) if isinstance(step, dict) else 0
        self.record.update(tests=tests, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        with open(self.json_path, "w") as f:
            json.dump(self.record, f, indent=1)


def stage_build(check, _=None):
    import torch
    major, minor = torch.cuda.get_device_capability()
    cap = best_cpu_capability()
    env = {"PYATTN_CPU_CAPABILITIES": cap, "MAX_JOBS": str(os.cpu_count()), "NVCC_THREADS": "2"}
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    deadline = check.deadline(STAGE_CAP_S["build"])
    if shutil.which("nvcc"):
        rc = check.steps("build", {"cuda": cmd}, deadline, env={**env, "PYATTN_FORCE_CUDA": "1",
                                                                "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"})["cuda"][0]
        if rc == 0:
            return
    check.steps("build", {"cpu-only": cmd}, deadline, env={**env, "PYATTN_SKIP_CUDA_BUILD": "1"})


def stage_tests(check, backend=None):
    """The Triton and the CUDA C++ tests at once (backend: only one of them)."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    if importlib.util.find_spec("pytest_timeout"):  # one hung test must not take the stage with it
        pytest.append("--timeout=90")
    xdist = importlib.util.find_spec("xdist") is not None
    workers = max(1, (os.cpu_count() or 2) * 5 // 8)  # the Triton run compiles; the CUDA run mostly waits on the GPU
    # the ahead-of-time compile checks run on every machine: not worth GPU minutes
    runs = {}
    if backend in (None, "triton"):
        runs["tests-triton"] = [*pytest, *(["-n", str(workers)] if xdist else []), "-k", "triton",
                                "--ignore=tests/backends/test_triton_compile.py", "tests"]
    if backend in (None, "cuda") and _has_cuda_build():
        runs["tests-cuda"] = [*pytest, *(["-n", "4"] if xdist else []), "-k", "cuda",
                              "--ignore=tests/backends/test_cuda_compile.py", "tests"]
    failures = os.path.join(check.out_dir, "test-failures.txt")  # written as they happen: survives a timeout
    check.steps("tests", runs, check.deadline(STAGE_CAP_S["tests"]), env={"PYATTN_FAILURE_LOG": failures})


def _benchmarks_cmd(check, args, deadline, margin_s):
    """python -m benchmarks on the GPU, its records in check's folder, told to stop margin_s before deadline: the
    time it needs to write them."""
    return [sys.executable, "-m", "benchmarks", "--device", "cuda", "--out", check.out_dir, *args,
            "--time-limit", str(int(deadline - time.time() - margin_s))]


def stage_bench(check, _=None):
    deadline = check.deadline(STAGE_CAP_S["bench"])
    impls = TARGET_IMPLS if _has_cuda_build() else [i for i in TARGET_IMPLS if i != "pyattn-cuda"]
    check.steps("bench", {"targets": _benchmarks_cmd(check, [*TARGET_BENCH, "--impl", *impls], deadline, 25)},
                deadline)


def stage_serving(check, _=None):
    deadline = check.deadline(STAGE_CAP_S["serving"])
    impls = ["pyattn-triton", "torch-sdpa"] + (["pyattn-cuda"] if _has_cuda_build() else [])
    check.steps("serving", {"serving": _benchmarks_cmd(check, [*SERVING_BENCH, "--impl", *impls], deadline, 15)},
                deadline)


def stage_sanitizer(check, _=None):
    """compute-sanitizer memcheck and racecheck over benchmarks.sanitize, one after the other."""
    if not _has_cuda_build():
        return
    tool = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                             "compute-sanitizer")
    if not os.access(tool, os.X_OK):
        check.record["stages"]["sanitizer"] = {"missing": "no compute-sanitizer"}
        return check.save()
    deadline = check.deadline(STAGE_CAP_S["sanitizer"])
    for tool_name in ("memcheck", "racecheck"):
        half = time.time() + (deadline - time.time()) / (2 if tool_name == "memcheck" else 1)
        check.steps("sanitizer", {tool_name: [tool, "--tool", tool_name, "--error-exitcode", "3", sys.executable,
                                              "-m", "benchmarks.sanitize"]}, half)


def stage_sweep(check, _=None):
    left = check.end - time.time()
    if left < 45:
        return
    check.steps("sweep", {"quick": _benchmarks_cmd(check, ["--quick"], check.end, 30)}, check.end)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--stage", help=f"comma-separated stages to run, in this order (default: {','.join(STAGES)})")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all stages together")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", re.sub(r"[^a-z0-9]+", "-", gpu.lower()))
    os.makedirs(out_dir, exist_ok=True)
    named = args.stage.split(",") if args.stage else list(STAGES)
    # a group's name expands (sweep, both a stage and a group, brings the serving points along)
    stages = list(dict.fromkeys(s for name in named for s in GROUPS.get(name, [name])))  # each stage once
    unknown = {s for s in stages if s.split(":")[0] not in STAGES or s.startswith("tests:") and
               s not in ("tests:triton", "tests:cuda")}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}, tests:triton, "
                         f"tests:cuda; groups: {', '.join(GROUPS)}")
    if args.stage:  # the stages named take the whole budget
        STAGE_CAP_S.update({s.split(":")[0]: args.budget for s in stages})
    check = Check(out_dir, gpu, args.budget)
    if gpu == "no-gpu":
        check.log.write("== no CUDA GPU: nothing to check\n")
        check.save()
    else:
        run = {"build": stage_build, "tests": stage_tests, "bench": stage_bench, "serving": stage_serving,
               "sanitizer": stage_sanitizer, "sweep": stage_sweep}
        for stage in stages:
            name, _, arg = stage.partition(":")
            if time.time() < check.end:
                run[name](check, arg or None)
        check.save()
    check.log.close()
    print(json.dumps(check.record, indent=1))


if __name__ == "__main__":
    main()
