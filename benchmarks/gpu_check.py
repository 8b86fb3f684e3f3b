"""make gpu-check: on a GPU machine, offline, with its system python3.

Builds pyattn._C with the CUDA kernels, runs the whole test suite on CUDA, runs the GPU benchmark sweep,
and writes gpu-check.json ({commit, date, device, torch, triton, cuda, tests}) beside the benchmark
records in benchmarks/results/<gpu>/ (or --out DIR). Stays under 9 minutes: each stage has a deadline.
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
BUDGET_S = 9 * 60


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    start = time.time()
    left = lambda: BUDGET_S - (time.time() - start)  # noqa: E731
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", re.sub(r"[^a-z0-9]+", "-", gpu.lower()))
    os.makedirs(out_dir, exist_ok=True)
    returncodes = {}  # per stage: 0 ok, 124 ran out of its time, else failed; counts alone hide a crash
    with open(os.path.join(out_dir, "gpu-check.log"), "w") as log:
        rc, out, dt = _run([sys.executable, "setup.py", "build_ext", "--inplace"], left() - 240,
                           env={"MAX_JOBS": str(os.cpu_count()), "NVCC_THREADS": "4"})
        returncodes["build"] = rc
        log.write(f"== build rc={rc} {dt:.0f}s\n{out[-20000:]}\n")
        rc, out, dt = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], left() - 270)
        returncodes["tests"] = rc
        tests = _counts(out)
        log.write(f"== tests rc={rc} {dt:.0f}s\n{out[-50000:]}\n")
        sanitizer, out = _sanitizer(min(120, left() - 150))
        log.write(out)
        rc, out, dt = _run([sys.executable, "-m", "benchmarks", "--device", "cuda", "--quick", "--out", out_dir,
                            "--time-limit", str(int(left() - 60))], left() - 10)
        returncodes["bench"] = rc
        log.write(f"== bench rc={rc} {dt:.0f}s\n{out[-20000:]}\n")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = dict(commit=_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=gpu, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, tests=tests,
                  returncodes=returncodes, sanitizer=sanitizer,
                  seconds=round(time.time() - start))
    with open(os.path.join(out_dir, "gpu-check.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
