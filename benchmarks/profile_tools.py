"""The steps of `python -m benchmarks.gpu_profile` that run outside tools on a GPU machine: ncu (Nsight Compute over
six kernels, each launched by a small driver process), artifacts (this run's Triton cache and the SASS of pyattn._C)
and smoke (a short pytest subset of the GPU tests). plan_<step>() says what a step would run, without a GPU."""
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from . import gpu_run, profile_steps

# name: (ncu --kernel-name: the kernel's function name, what the driver runs)
KERNELS = {
    "dkdv": ("_attn_bwd_dkdv", "bwd d64 full"),
    "dq": ("_attn_bwd_dq", "bwd d64 full"),
    "fwd-d128": ("_attn_fwd", "fwd d128 full"),
    "decode-split": ("_attn_fwd", "decode B1 S128k contiguous"),
    "decode-combine": ("_attn_fwd_combine", "decode B1 S128k contiguous"),
    "cuda-dkdv": ("dkdv_kernel", "bwd d64 full, CUDA C++ backend"),
}
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis")
NCU_KERNEL_TIMEOUT_S = 40
NCU_REFUSED = ("ERR_NVGPUCTRPERM", "LibraryNotLoaded", "Failed to initialize the profiler")


# ---------------------------------------------------------------------------------------------- kernel drivers

def driver_point(name):
    """The attention point (profile_steps.attention_points) whose call drives kernel `name`; None for decode's."""
    what = KERNELS[name][1]
    if what.startswith("decode"):
        return None
    pass_, dim = what.split()[:2]
    return next(p for p in profile_steps.attention_points() if p.pass_ == pass_ and f"d{p.D}" == dim and not p.causal)


DRIVER_DECODE = (1, 131072, "contiguous")  # (B, S, layout) of the decode kernels' driver


def _driver_call(name):
    """The one call whose kernel `name` ncu profiles (fixed tiles: no autotune launches before it)."""
    point = driver_point(name)
    if point is None:
        return profile_steps.decode_call(*DRIVER_DECODE)[0]
    return profile_steps.attention_step(point, backend="cuda" if name.startswith("cuda") else "triton")


def drive(name):
    """`python -m benchmarks.gpu_profile --kernel-driver NAME`: runs NAME's call once (ncu takes its first launch)."""
    with profile_steps.fixed_tiles():
        _driver_call(name)()
    profile_steps.sync()


# ---------------------------------------------------------------------------------------------------------- ncu

def find_ncu():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [shutil.which("ncu"), os.path.join(cuda_home, "bin", "ncu"),
                  *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def ncu_command(ncu, name, python=None):
    kernel = KERNELS[name][0]
    sections = [arg for s in NCU_SECTIONS for arg in ("--section", s)]
    # --clock-control none: the card as found (ncu's default locks base clocks, and this is a shared machine)
    return [ncu, "--target-processes", "all", "--kernel-name", kernel, "--launch-count", "1", "--clock-control",
            "none", *sections, "--csv", "--page", "details", python or sys.executable, "-m",
            "benchmarks.gpu_profile", "--kernel-driver", name]


def split_ncu_output(text):
    """ncu's stdout -> (the CSV rows, its own messages: ==PROF==/==WARNING==/==ERROR== lines and the driver's)."""
    csv_lines, log_lines = [], []
    for line in text.splitlines():
        (csv_lines if line.startswith('"') else log_lines).append(line)
    return "\n".join(csv_lines) + ("\n" if csv_lines else ""), "\n".join(log_lines)


def ncu_status(rc, csv_text, log_text):
    refused = next((word for word in NCU_REFUSED if word in log_text), None)
    if refused:
        return "refused", next(ln for ln in log_text.splitlines() if refused in ln).strip()
    if rc == 124:
        return "timeout", f"no result in {NCU_KERNEL_TIMEOUT_S} s"
    if not csv_text:
        return "no kernel profiled", (log_text.strip().splitlines() or [f"rc {rc}"])[-1]
    return ("done", None) if rc == 0 else ("failed", f"rc {rc}")


def plan_ncu():
    ncu = find_ncu() or "ncu"
    return dict(ncu=find_ncu() or "not found", files=[f"ncu-{n}.csv" for n in KERNELS] + ["ncu.json"],
                commands={n: shlex.join(ncu_command(ncu, n)) for n in KERNELS})


def run_ncu(ctx):
    ncu, results = find_ncu(), {}
    if ncu is None:
        results["all"] = dict(status="missing", reason="no ncu on PATH, in $CUDA_HOME/bin or /opt/nvidia")
    else:
        cuda_built = gpu_run.has_cuda_build()
        for name in KERNELS:
            if name.startswith("cuda") and not cuda_built:
                results[name] = dict(status="skipped", reason="no CUDA C++ build in this tree")
                continue
            refused = next((r for r in results.values() if r["status"] == "refused"), None)
            if refused:  # the same machine refuses every kernel: keep the minutes
                results[name] = dict(status="skipped", reason=f"ncu refused: {refused['reason']}")
                continue
            if not ctx.time_left(15):
                results[name] = dict(status="skipped", reason="out of the step's time")
                continue
            cmd = ncu_command(ncu, name)
            t0 = time.time()
            rc, out, _ = gpu_run.wait(gpu_run.start(cmd), min(time.time() + NCU_KERNEL_TIMEOUT_S, ctx.deadline))
            csv_text, log_text = split_ncu_output(out)
            with open(os.path.join(ctx.dir, f"ncu-{name}.csv"), "w") as f:
                f.write(csv_text)
            with open(os.path.join(ctx.dir, f"ncu-{name}.log"), "w") as f:
                f.write(log_text[-200_000:])
            status, reason = ncu_status(rc, csv_text, log_text)
            results[name] = dict(status=status, reason=reason, seconds=round(time.time() - t0, 1), command=cmd)
            profile_steps.write_json(os.path.join(ctx.dir, "ncu.json"), results)
    profile_steps.write_json(os.path.join(ctx.dir, "ncu.json"), results)
    return {n: r["status"] for n, r in results.items()}


# ---------------------------------------------------------------------------------------------------- artifacts

TRITON_SUFFIXES = (".cubin", ".ptx", ".ttgir", ".json")
TRITON_LIMIT = 16 << 20  # bytes copied from the Triton cache (the step's archive must stay well under 16 MB)
SASS_LIMIT = 40 << 20  # bytes of SASS text kept (it compresses ~8x); past it, the functions SASS_KEEP names
SASS_KEEP = re.compile(r"dkdv|dq_kernel|fwd|decode")


def triton_files(cache_dir, limit=TRITON_LIMIT):
    """(kept, left out): the cache's (path, bytes) of TRITON_SUFFIXES, smallest kernels' files first within limit."""
    found = []
    for folder, _, files in os.walk(cache_dir or ""):
        found += [(os.path.join(folder, f), os.path.getsize(os.path.join(folder, f)))
                  for f in files if f.endswith(TRITON_SUFFIXES)]
    kept, left, total = [], [], 0
    for path, size in sorted(found, key=lambda item: (item[1], item[0])):
        (kept if total + size <= limit else left).append((path, size))
        total += size if total + size <= limit else 0
    return kept, left


def cuda_sos(root=gpu_run.ROOT):
    return sorted(glob.glob(os.path.join(root, "pyattn", "_C*.so")))


def sass_sections(text, limit=SASS_LIMIT):
    """cuobjdump -sass output within limit: whole where it fits, else only the functions SASS_KEEP names."""
    if len(text) <= limit:
        return text, None
    parts = re.split(r"(?m)^(?=\s*Function : )", text)
    kept = [p for p in parts if SASS_KEEP.search(p.split("\n", 1)[0])]
    note = f"{len(text)} bytes of SASS: kept the {len(kept)} functions matching {SASS_KEEP.pattern}"
    return "".join(kept)[:limit], note


def cuobjdump():
    tool = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                     "cuobjdump")
    return tool if os.access(tool, os.X_OK) else None


def plan_artifacts():
    return dict(files=["triton-cache/<hash>/<kernel>.{cubin,ptx,ttgir,json}", "cuda-sass.txt", "artifacts.json"],
                triton_cache=os.environ.get("TRITON_CACHE_DIR"), limit_bytes=TRITON_LIMIT,
                commands=[f"{cuobjdump() or 'cuobjdump'} -sass {so}" for so in cuda_sos()] or ["no pyattn/_C*.so"])


def run_artifacts(ctx):
    cache = os.environ.get("TRITON_CACHE_DIR")
    kept, left = triton_files(cache)
    for path, _ in kept:
        dst = os.path.join(ctx.dir, "triton-cache", os.path.relpath(path, cache))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(path, dst)
    record = dict(triton_cache=cache, triton_files=len(kept), triton_bytes=sum(s for _, s in kept),
                  left_out=[os.path.relpath(p, cache) for p, _ in left])
    tool, sos = cuobjdump(), cuda_sos() if gpu_run.has_cuda_build() else []
    if not sos:
        record["sass"] = "no CUDA C++ build in this tree"
    elif tool is None:
        record["sass"] = "no cuobjdump"
    else:
        cmd = [tool, "-sass", *sos]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, ctx.deadline - time.time() - 3))
        except subprocess.TimeoutExpired:
            record["sass"] = f"{shlex.join(cmd)}: ran past the step's time"
        else:
            text, note = sass_sections(out.stdout)
            with open(os.path.join(ctx.dir, "cuda-sass.txt"), "w") as f:
                f.write(text)
            record.update(sass=f"{shlex.join(cmd)}: rc {out.returncode}", sass_note=note,
                          sass_stderr=out.stderr[-2000:])
    profile_steps.write_json(os.path.join(ctx.dir, "artifacts.json"), record)
    return {k: record[k] for k in ("triton_files", "triton_bytes", "sass")}


# -------------------------------------------------------------------------------------------------------- smoke

SMOKE_TESTS = ["tests/backends/test_triton.py", "tests/backends/test_triton_kvcache.py",
               "tests/backends/test_cuda_kvcache.py"]
SMOKE_K = "triton or cuda"


def smoke_command(python=None):
    cmd = [python or sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append("--timeout=60")
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(max(1, (os.cpu_count() or 2) * 5 // 8))]
    return [*cmd, "-k", SMOKE_K, *SMOKE_TESTS]


def plan_smoke():
    return dict(files=["smoke.log", "smoke.json", "test-failures.txt"], command=shlex.join(smoke_command()))


def run_smoke(ctx):
    failures = os.path.join(ctx.dir, "test-failures.txt")
    cmd = smoke_command()
    rc, out, _ = gpu_run.wait(gpu_run.start(cmd, env={"PYATTN_FAILURE_LOG": failures}), ctx.deadline - 3)
    with open(os.path.join(ctx.dir, "smoke.log"), "w") as f:
        f.write(out[-2_000_000:])
    record = dict(command=cmd, returncode=rc, **gpu_run.pytest_counts(out))
    with open(os.path.join(ctx.dir, "smoke.json"), "w") as f:
        json.dump(record, f, indent=1)
    return {k: record[k] for k in ("returncode", "passed", "failed", "skipped", "counted_from")}
