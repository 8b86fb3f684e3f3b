"""make gpu-profile OUT=DIR [BUDGET=seconds] [STEPS=a,b]: issue 31 item 7's profile, on a GPU machine, offline, with
its system python3, in one command of under 10 minutes.

    python -m benchmarks.gpu_profile --out DIR [--budget 540] [--steps env,kernels,...] [--dry-run] [--no-pack]

Steps, most valuable first, each in its own process under a cap and the one budget (a step is skipped, with the
reason recorded, when less than its minimum is left); each step writes into DIR/<step>/ as it goes, and once it ends
that folder is packed into DIR/<step>.tar.gz (--no-pack keeps the folder): the device tool brings back at most 8
files, so DIR holds the 7 archives and profile-index.json (each step's status, reason, seconds, files, summary),
rewritten after every step, so a run cut off still leaves everything done so far.
  env           pyattn's build for this GPU where the tree has none (gpu_check's build stage), versions, clocks
                (nvidia-smi), and this run's ceilings: copy GB/s and bf16 matmul TFLOP/s
  kernels       kernel-only times (torch.profiler): Triton forward and backward at 16k tokens, KV-cache decode
                eager and under CUDA-graph replay (the capture's error where it fails), eager wall time per call
  decode-sweep  decode split counts x tiles (kernel time of the split and combine kernels)
  autotune      the Triton backward's autotune over a widened candidate list, every candidate's time, and
                Triton's autotune cache files
  ncu           Nsight Compute sections of six kernels, one driver process each (--kernel-driver NAME)
  artifacts     this run's Triton cache (cubin, ptx, ttgir) and cuobjdump -sass of pyattn/_C*.so
  smoke         a short pytest subset of the GPU tests, counted from the progress marks when cut off
--dry-run plans every step (shapes, files, command lines, the budget's worst case) without a GPU. TRITON_CACHE_DIR
is a fresh folder per run (beside DIR, not in it), so it holds this run's kernels only.
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from . import gpu_run, profile_steps, profile_tools

INDEX = "profile-index.json"
STEP_LOG_CHARS = 500_000
ARCHIVE_LIMIT = 16 << 20  # the most the device tool brings back per file (8 files)
GRACE_S = 5  # past a step's deadline before its process is killed: it writes its last rows


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # the most seconds it may take
    min_s: float  # skipped with less than this left
    plan: Callable
    run: Callable


# caps from the first H200 run (2026-11-30: build 59-63 s, a backward autotune ~1 min) and estimates for the rest:
# steps that all ran to their caps would still reach the artifacts; the smoke tests get what the others leave
STEPS = (
    Step("env", 150, 40, profile_steps.plan_env, profile_steps.run_env),
    Step("kernels", 110, 30, profile_steps.plan_kernels, profile_steps.run_kernels),
    Step("decode-sweep", 60, 20, profile_steps.plan_decode_sweep, profile_steps.run_decode_sweep),
    Step("autotune", 90, 30, profile_steps.plan_autotune, profile_steps.run_autotune),
    Step("ncu", 100, 25, profile_tools.plan_ncu, profile_tools.run_ncu),
    Step("artifacts", 30, 5, profile_tools.plan_artifacts, profile_tools.run_artifacts),
    Step("smoke", 120, 30, profile_tools.plan_smoke, profile_tools.run_smoke),
)
BY_NAME = {s.name: s for s in STEPS}


class Context:
    """What a step gets: its folder, its deadline (epoch seconds) and the profile's index so far."""

    def __init__(self, out_dir, name, deadline, index):
        self.dir = os.path.join(out_dir, name)
        self.deadline, self.index = deadline, index
        os.makedirs(self.dir, exist_ok=True)

    def time_left(self, seconds):
        return self.deadline - time.time() >= seconds


def allot(step, now, end, caps=None):
    """-> (deadline, None) for a step starting at now in a budget ending at end, or (None, why it is skipped)."""
    left = end - now
    if left < step.min_s:
        return None, f"budget: {left:.0f} s left, the step needs at least {step.min_s:.0f} s"
    return min(now + (caps or {}).get(step.name, step.cap_s), end), None


def plan(steps, budget_s, caps=None):
    """The dry run: each step's plan and when it would start and end if every step before it took its whole cap."""
    index, now = {}, 0.0
    for step in steps:
        deadline, why = allot(step, now, budget_s, caps)
        entry = dict(status="planned" if why is None else "would skip", reason=why,
                     starts_at_s=round(now), cap_s=(caps or {}).get(step.name, step.cap_s), min_s=step.min_s)
        try:
            entry["plan"] = step.plan()
        except Exception as e:  # noqa: BLE001 - a plan that cannot be made is the dry run's finding
            entry.update(status="plan failed", reason=f"{type(e).__name__}: {e}")
        index[step.name] = entry
        now = deadline if deadline is not None else now
    return index


class Profile:
    """DIR/profile-index.json, written again after every step."""

    def __init__(self, out_dir, budget_s, device, dry_run):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, INDEX)
        os.makedirs(out_dir, exist_ok=True)
        self.end = time.time() + budget_s
        self.record = dict(commit=gpu_run.commit(), device=device, budget_s=budget_s, dry_run=dry_run,
                           python=sys.executable, triton_cache_dir=os.environ.get("TRITON_CACHE_DIR"),
                           steps=self._earlier_steps(device, dry_run))
        self.save()

    def _earlier_steps(self, device, dry_run):
        """The steps an earlier run of the same commit on the same device left in this folder (a later run of some
        steps adds to them), never a dry run's plans."""
        if dry_run or not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            earlier = json.load(f)
        same = (earlier.get("commit"), earlier.get("device"), earlier.get("dry_run")) == (gpu_run.commit(), device,
                                                                                          False)
        return earlier.get("steps", {}) if same else {}

    def save(self):
        self.record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        profile_steps.write_json(self.path, self.record)

    def step(self, name, **entry):
        self.record["steps"][name] = entry
        self.save()
        print(f"[gpu-profile] {name}: {entry['status']} {entry.get('seconds') or ''} {entry.get('reason') or ''}",
              flush=True)


def step_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def pack(out_dir, name):
    """DIR/<name>/ -> DIR/<name>.tar.gz (the folder removed) -> the archive's bytes."""
    folder, archive = os.path.join(out_dir, name), os.path.join(out_dir, f"{name}.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=name)
    shutil.rmtree(folder)
    return os.path.getsize(archive)


def run_step(profile, step, deadline, packed):
    """Runs step in its own process (a crash or a hang ends there, not here) until deadline; records it."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_profile", "--out", profile.out_dir, "--run-step", step.name,
           "--deadline", f"{deadline:.1f}"]
    folder = os.path.join(profile.out_dir, step.name)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's files are not this run's
    t0 = time.time()
    rc, out, ended = gpu_run.wait(gpu_run.start(cmd, env={"PYTHONUNBUFFERED": "1"}), deadline + GRACE_S)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "step.log"), "w") as f:
        f.write(out[-STEP_LOG_CHARS:])
    summary_path = os.path.join(folder, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    status = {0: "done", 124: "timeout"}.get(rc, "failed")
    entry = dict(status=status, returncode=rc, seconds=round(ended - t0, 1), files=step_files(folder),
                 summary=summary, reason=None if rc == 0 else out.strip().splitlines()[-1:])
    if packed:
        entry.update(archive=f"{step.name}.tar.gz", archive_bytes=pack(profile.out_dir, step.name))
        if entry["archive_bytes"] > ARCHIVE_LIMIT:
            entry["warning"] = f"archive over {ARCHIVE_LIMIT >> 20} MiB: the device tool will not bring it back"
    profile.step(step.name, **entry)


def selected(names):
    if not names:
        return list(STEPS)
    unknown = [n for n in names.split(",") if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; steps: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in dict.fromkeys(names.split(","))]


def child(args):
    """--run-step NAME: one step's work in this process, its summary into DIR/<name>/summary.json."""
    with open(os.path.join(args.out, INDEX)) as f:
        index = json.load(f)
    ctx = Context(args.out, args.run_step, args.deadline, index)
    summary = BY_NAME[args.run_step].run(ctx)
    profile_steps.write_json(os.path.join(ctx.dir, "summary.json"), summary)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="the folder that receives the profile (the device tool's $OUT)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps together")
    ap.add_argument("--steps", help=f"comma-separated, in this order (default: {','.join(BY_NAME)})")
    ap.add_argument("--dry-run", action="store_true", help="plan every step without a GPU; write the index")
    ap.add_argument("--no-pack", action="store_true", help="keep each step's folder instead of DIR/<step>.tar.gz")
    ap.add_argument("--run-step", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--kernel-driver", choices=sorted(profile_tools.KERNELS), help="run one kernel's call (for ncu)")
    args = ap.parse_args(argv)
    if args.kernel_driver:
        return profile_tools.drive(args.kernel_driver)
    if not args.out:
        ap.error("--out DIR is required")
    args.out = os.path.abspath(args.out)  # the steps run from the tree's root
    if args.run_step:
        return child(args)
    steps = selected(args.steps)
    # --steps: the steps named share the whole budget, as gpu_check's STAGE does
    caps = {s.name: args.budget for s in steps} if args.steps else None
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pyattn-profile-triton-")
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    profile = Profile(args.out, args.budget, gpu or "no-gpu", args.dry_run)
    if args.dry_run:
        for name, entry in plan(steps, args.budget, caps).items():
            profile.step(name, **entry)
    else:
        for step in steps:
            deadline, why = allot(step, time.time(), profile.end, caps)
            if gpu is None:
                why = "no CUDA GPU (torch.cuda.is_available() is False)"
            if why:
                profile.step(step.name, status="skipped", reason=why, seconds=0, files=[])
                continue
            run_step(profile, step, deadline, packed=not args.no_pack)
    print(json.dumps({n: (e["status"], e.get("seconds"), e.get("reason")) for n, e in profile.record["steps"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
