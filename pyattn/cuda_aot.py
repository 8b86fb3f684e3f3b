"""Ahead-of-time compile of the CUDA C++ kernels (csrc/cuda) with nvcc alone, no GPU and no torch headers:
one cubin per instantiation file, for sm_80 or sm_90a, read back with pyattn.sass.

`aot_reports(arch)` is what `python -m pyattn.inspect` calls. Cubins are cached under build/cuda_aot, keyed
by the sources, the flags and the nvcc version, so a second run compiles nothing."""
import concurrent.futures
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

from . import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
INST = os.path.join(CSRC, "cuda", "inst")
CACHE = os.path.join(ROOT, "build", "cuda_aot")
FLAGS_FILE = os.path.join(CSRC, "cuda", "nvcc_flags.txt")  # setup.py compiles with the same list
# sm_90a (not sm_90) so that Hopper-only instructions are allowed
GENCODE = {80: "arch=compute_80,code=sm_80", 90: "arch=compute_90a,code=sm_90a"}
# kernel (part of the mangled name) -> the tiles.h constant holding its dynamic shared memory (None: static)
KERNELS = {"fwd_kernel": "FwdTiles<{d}>::kSmem", "fwd_sm90_kernel": "Sm90Tiles::kSmem", "dkdv_kernel": "BwdTiles<{d}>::kDkvSmem",
           "dq_kernel": "BwdTiles<{d}>::kDqSmem", "delta_kernel": None}
INSTANCE = re.compile(r"(fwd|bwd|fwd_sm90)_(fp16|bf16)_d(\d+)(_causal)?$")


def find_nvcc():
    """Path of nvcc (PATH, then $CUDA_HOME/bin), or None."""
    return shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                             "bin", "nvcc"))


def nvcc():
    found = find_nvcc()
    if not found:
        raise sass.MissingTool("pyattn.cuda_aot needs nvcc: put the CUDA toolkit's bin/ on PATH or set CUDA_HOME")
    return found


@functools.cache
def flags():
    with open(FLAGS_FILE) as f:
        return tuple(f.read().split())


def instances(arch: int):
    """Names of the instantiation files (fwd_bf16_d128_causal, ...) that hold code for sm_<arch>, sorted: the
    fwd_sm90 ones compile to empty kernels below sm_90a."""
    if not os.path.isdir(INST):
        raise sass.MissingTool(f"pyattn.cuda_aot needs the sources in {INST} (a source checkout)")
    return sorted(f[:-3] for f in os.listdir(INST) if f.endswith(".cu") and (arch >= 90 or "sm90" not in f))


@functools.lru_cache(maxsize=None)
def _source_digest():
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(CSRC)):
        for f in sorted(files):
            if f.endswith((".cuh", ".cu", ".h")):
                with open(os.path.join(folder, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    version = subprocess.run([nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    h.update(version.encode() + " ".join(flags()).encode())
    return h.hexdigest()[:16]


def cubin(instance: str, arch: int) -> bytes:
    """Compiles csrc/cuda/inst/<instance>.cu for sm_<arch> (cached) and returns the cubin."""
    path = os.path.join(CACHE, f"{instance}-sm{arch}-{_source_digest()}.cubin")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        cmd = [nvcc(), *flags(), "-I", CSRC, "-gencode", GENCODE[arch], "-cubin", "-o", tmp,
               os.path.join(INST, instance + ".cu")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {instance} for sm_{arch}:\n{done.stderr}")
        os.replace(tmp, path)
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def dynamic_smem() -> dict:
    """{"FwdTiles<128>::kSmem": bytes, ...} computed by compiling tiles.h with the host compiler."""
    exprs = sorted({e.format(d=d) for e in KERNELS.values() if e for d in (64, 128, 192, 256)})
    prints = "\n".join(f'  std::printf("\\"%s\\": %d,\\n", "{e}", pyattn::cuda::{e});' for e in exprs)
    program = f'#include <cstdio>\n#include "cuda/tiles.h"\nint main() {{\n  std::printf("{{\\n");\n{prints}\n' \
              '  std::printf("\\"\\": 0}\\n");\n}\n'
    cxx = shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise sass.MissingTool("pyattn.cuda_aot needs a host C++ compiler (c++ or g++) to read tiles.h")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "tiles.cpp"), os.path.join(d, "tiles")
        with open(src, "w") as f:
            f.write(program)
        subprocess.run([cxx, "-std=c++17", "-I", CSRC, src, "-o", exe], check=True, capture_output=True)
        return json.loads(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)


def reports_of(instance: str, arch: int) -> list[dict]:
    """One report per kernel in the instance's cubin, named like cuda_bwd_dkdv_bf16_d128_causal."""
    kind, dtype, d, causal = INSTANCE.match(instance).groups()
    binary = cubin(instance, arch)
    usage = sass.resource_usage(binary)
    out = []
    for function in sorted(usage):
        kernel = next((k for k in KERNELS if f"{len(k)}{k}" in function), None)  # mangled: length, then name
        if kernel is None:
            continue
        smem = dynamic_smem()[KERNELS[kernel].format(d=d)] if KERNELS[kernel] else 0
        part = kind if kind.startswith("fwd") else "bwd_" + kernel[:-len("_kernel")]
        # the delta prepass does not depend on the head dim or the window
        name = f"cuda_{part}_{dtype}" + ("" if part == "bwd_delta" else f"_d{d}{causal or ''}")
        out.append({"name": name, "backend": "cuda", "arch": f"sm_{arch}", "function": function,
                    **sass.report(binary, function, smem, usage)})
    return out


def aot_reports(arch: int, only=None) -> list[dict]:
    """Reports for every kernel of every instantiation (or the instances in `only`) compiled for sm_<arch>
    (90 means sm_90a). Compiles in parallel, one nvcc per core."""
    if arch not in GENCODE:
        raise ValueError(f"arch must be one of {sorted(GENCODE)}, got {arch}")
    names = list(only) if only is not None else instances(arch)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        per_instance = list(pool.map(lambda n: reports_of(n, arch), names))
    seen, reports = set(), []
    for r in (r for rs in per_instance for r in rs):
        if r["name"] not in seen:  # the delta prepass is in every bwd file
            seen.add(r["name"])
            reports.append(r)
    return reports
