"""make gpu-check [STAGE=triton|cuda|sweep]: on a GPU machine, offline, with its system python3.

A GPU loan is short (about 15 minutes with its cold start, 10 minutes a command) and may be cut off, so the
check runs in stages ordered by value per minute, and rewrites gpu-check.json ({commit, date, device, torch,
triton, cuda, tests, stages}) after every stage, beside the benchmark records in benchmarks/results/<gpu>/
(or --out DIR):
  triton  CPU-only build of pyattn._C (no nvcc), the Triton backend's tests on CUDA, and the benchmark points
          the README's GPU targets name (Triton and torch's SDPA, bf16): a record within minutes of a cold start
  cuda    the CUDA C++ build for this GPU's arch only, its tests, compute-sanitizer memcheck and racecheck
  sweep   the rest of the GPU benchmark sweep, up to the time left
Each stage also runs alone; a later stage keeps the records of earlier ones already in gpu-check.json.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("triton", "cuda", "sweep")
BUDGET_S = {"triton": 5 * 60, "cuda": 4 * 60, "sweep": 3 * 60}  # what each stage may take, all stages 12 min
TARGET_BENCH = ["--dtype", "bf16", "--seqlens", "4096", "16384", "--impl", "pyattn-triton", "torch-sdpa-flash",
                "torch-sdpa-cudnn"]


def _run(cmd, timeout, env=None):
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 10),
                             env={**os.environ, **(env or {})})
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
    return rc, out, time.time() - t0


def _commit():
    head = os.path.join(ROOT, ".git", "HEAD")
    try:  # read .git directly: the GPU machine's copy of the tree may have no git binary or history
        ref = open(head).read().strip()
        if ref.startswith("ref: "):
            return open(os.path.join(ROOT, ".git", ref[5:])).read().strip()
        return ref
    except OSError:
        return "unknown"


def _counts(pytest_output):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    tail = pytest_output.strip().splitlines()[-1:] or [""]
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail[0]):
        counts["failed" if word.startswith("error") else word] += int(n)
    return counts


def _sanitizer(deadline_s):
    """compute-sanitizer memcheck and racecheck over benchmarks.sanitize: {tool: "ok" | "errors" | ...}."""
    tool = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                             "compute-sanitizer")
    if not os.access(tool, os.X_OK):
        return {"memcheck": "no compute-sanitizer", "racecheck": "no compute-sanitizer"}, ""
    verdicts, logs = {}, ""
    for check in ("memcheck", "racecheck"):
        rc, out, dt = _run([tool, "--tool", check, "--error-exitcode", "3", sys.executable, "-m",
                            "benchmarks.sanitize"], deadline_s / 2)
        verdicts[check] = "ok" if rc == 0 else ("timeout" if rc == 124 else f"errors (rc={rc})")
        logs += f"== sanitizer {check} rc={rc} {dt:.0f}s\n{out[-20000:]}\n"
    return verdicts, logs


class Check:
    """gpu-check.json and gpu-check.log in out_dir, written again after every step."""

    def __init__(self, out_dir, gpu):
        self.json_path = os.path.join(out_dir, "gpu-check.json")
        self.log = open(os.path.join(out_dir, "gpu-check.log"), "a")
        import torch
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

    def step(self, stage, name, cmd, timeout, env=None):
        rc, out, dt = _run(cmd, timeout, env)
        self.log.write(f"== {stage}/{name} rc={rc} {dt:.0f}s\n{out[-50000:]}\n")
        self.log.flush()
        entry = self.record["stages"].setdefault(stage, {})
        entry[name] = {"returncode": rc, "seconds": round(dt)}  # 0 ok, 124 out of time, else failed
        if name == "tests":
            entry[name].update(_counts(out))
        self.save()
        return rc, out

    def save(self):
        tests = {"passed": 0, "failed": 0, "skipped": 0}
        for stage in self.record["stages"].values():
            for k in tests:
                tests[k] += stage.get("tests", {}).get(k, 0)
        self.record.update(tests=tests, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        with open(self.json_path, "w") as f:
            json.dump(self.record, f, indent=1)


def stage_triton(check, out_dir, budget):
    end = time.time() + budget
    check.step("triton", "build", [sys.executable, "setup.py", "build_ext", "--inplace"], end - time.time() - 150,
               env={"PYATTN_SKIP_CUDA_BUILD": "1", "MAX_JOBS": str(os.cpu_count())})
    # the ahead-of-time compile checks run on every machine: not worth GPU minutes
    check.step("triton", "tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
                                   "--ignore=tests/test_triton_compile.py", "tests"], end - time.time() - 90)
    check.step("triton", "bench", [sys.executable, "-m", "benchmarks", "--device", "cuda", "--out", out_dir,
                                   *TARGET_BENCH, "--time-limit", str(int(end - time.time() - 20))],
               end - time.time())


def stage_cuda(check, out_dir, budget):
    import torch
    end = time.time() + budget
    major, minor = torch.cuda.get_device_capability()
    check.step("cuda", "build", [sys.executable, "setup.py", "build_ext", "--inplace"], end - time.time() - 120,
               env={"PYATTN_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
                    "MAX_JOBS": str(os.cpu_count()), "NVCC_THREADS": "4"})
    check.step("cuda", "tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                                 "--ignore=tests/test_cuda_compile.py", "tests"], end - time.time() - 60)
    verdicts, logs = _sanitizer(max(20, end - time.time()))
    check.log.write(logs)
    check.record["stages"]["cuda"]["sanitizer"] = verdicts
    check.save()


def stage_sweep(check, out_dir, budget):
    check.step("sweep", "bench", [sys.executable, "-m", "benchmarks", "--device", "cuda", "--quick", "--out", out_dir,
                                  "--time-limit", str(int(budget - 30))], budget)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--stage", choices=STAGES, help="run this stage alone (default: all, in order)")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", re.sub(r"[^a-z0-9]+", "-", gpu.lower()))
    os.makedirs(out_dir, exist_ok=True)
    check = Check(out_dir, gpu)
    if gpu == "no-gpu":
        check.log.write("== no CUDA GPU: nothing to check\n")
        check.save()
    else:
        run = {"triton": stage_triton, "cuda": stage_cuda, "sweep": stage_sweep}
        for stage in [args.stage] if args.stage else STAGES:
            run[stage](check, out_dir, BUDGET_S[stage])
    check.log.close()
    print(json.dumps(check.record, indent=1))


if __name__ == "__main__":
    main()
