"""`python -m pyattn.inspect --arch sm_80|sm_90 [--json]`: compile every kernel ahead of time, no GPU needed,
and report per kernel its registers, spills, shared memory and tensor-core opcodes read from the SASS.

Each backend provides `aot_reports(arch: int) -> list[dict]` (arch as 80/90) with the keys
name, backend, arch, registers, spill_bytes, shared_bytes, sass, sass_forms (see pyattn.sass.report)."""
import argparse
import importlib
import json
import os
import subprocess
import sys

from . import sass

# backend -> module with aot_reports(); each compiles its kernels its own way (Triton / nvcc)
SOURCES = {"triton": "pyattn.kernels.aot", "cuda": "pyattn.cuda_aot"}
ARCHS = {"sm_80": 80, "sm_90": 90}


def kernel_reports(arch: str, backends=tuple(SOURCES)) -> list[dict]:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # kernels defined under the interpreter cannot be compiled: report from a process that compiles them
        cmd = [sys.executable, "-m", "pyattn.inspect", "--arch", arch, "--json"]
        for backend in backends:
            cmd += ["--backend", backend]
        child = subprocess.run(cmd, env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"pyattn.inspect --arch {arch} failed:\n{child.stderr[-4000:]}")
        return json.loads(child.stdout)
    reports = []
    for backend in backends:
        reports += importlib.import_module(SOURCES[backend]).aot_reports(ARCHS[arch])
    return reports


def table(reports: list[dict]) -> str:
    rows = [f"{'kernel':<48} {'backend':<7} {'arch':<6} {'regs':>4} {'spill':>5} {'smem':>7}  tensor cores"]
    for r in reports:
        cores = ", ".join(f"{k} x{v}" for k, v in r["sass_forms"].items()) or "none"
        rows.append(f"{r['name']:<48} {r['backend']:<7} {r['arch']:<6} {r['registers']:>4} "
                    f"{r['spill_bytes']:>5} {r['shared_bytes']:>7}  {cores}")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyattn.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--backend", choices=sorted(SOURCES), action="append",
                        help="only this backend's kernels (repeatable; default all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    reports = []
    for backend in args.backend or SOURCES:
        try:
            reports += kernel_reports(args.arch, (backend,))
        except sass.MissingTool as e:  # e.g. a wheel: no CUDA C++ sources; a named backend must report
            if args.backend:
                raise
            print(f"pyattn.inspect: no {backend} kernels: {e}", file=sys.stderr)
    print(json.dumps(reports, indent=1) if args.json else table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
