"""Builds pyattn._C: op schemas and the fused CPU kernel always; CUDA kernels when nvcc and a CUDA torch exist.

Hermetic: no downloads, no git. Environment switches:
  PYATTN_SKIP_CUDA_BUILD=1   never build CUDA sources
  PYATTN_FORCE_CUDA=1        build them even when no GPU is visible (needs nvcc and a CUDA torch)
  TORCH_CUDA_ARCH_LIST       defaults to the visible GPUs, else "8.0;9.0"; 9.0 is built as sm_90a
  PYATTN_CPU_ARCH            opt-in -march for every CPU module (e.g. native: this machine's ISA only; the
                             wheel then runs on CPUs like it alone). Default: portable, see CPU_CAPABILITIES.
  PYATTN_CPU_CAPABILITIES    ";"-separated subset of CPU_CAPABILITIES to build (default: all of this arch's)
  MAX_JOBS, NVCC_THREADS     build parallelism
"""
import glob
import os
import platform
import re
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """pyattn/__init__.py's __version__, the one place the version is written (pyproject.toml declares it dynamic):
    read as text, since importing pyattn needs the extension this script builds."""
    with open(os.path.join(ROOT, "pyattn", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE).group(1)


VERSION = read_version()  # the package metadata and build_info()["version"] (PYATTN_VERSION)


def want_cuda():
    if os.environ.get("PYATTN_SKIP_CUDA_BUILD") == "1":
        return False
    has_toolchain = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if os.environ.get("PYATTN_FORCE_CUDA") == "1":
        if not has_toolchain:
            raise RuntimeError("PYATTN_FORCE_CUDA=1 needs nvcc on PATH and a CUDA build of torch")
        return True
    return has_toolchain and bool(glob.glob(os.path.join(ROOT, "csrc/cuda/**/*.cu"), recursive=True))


def cuda_archs():
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' archs, else "8.0;9.0"; 9.0 becomes 9.0a (Hopper-only
    instructions). Every kernel also runs on its sm_80 path, so any sm_80+ arch works."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs and torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    archs = archs or "8.0;9.0"
    return ";".join("9.0a" if a.strip() == "9.0" else a.strip() for a in archs.replace(" ", ";").split(";") if a)


# The CPU kernel (KERNEL_SOURCES) is compiled once per capability into pyattn._cpu_<name>, as ATen compiles its
# CPU_CAPABILITY kernels; pyattn/cpu_capability.py loads the best one the CPU has at run time.
# name -> (compiler flags, ATen CPU_CAPABILITY macros selecting at::vec's implementation, defines).
CPU_CAPABILITIES = {
    "x86_64": {
        "default": ([], ["CPU_CAPABILITY=DEFAULT"], []),
        "avx2": (["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
                 ["CPU_CAPABILITY=AVX2", "CPU_CAPABILITY_AVX2"], []),
        "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi",
                    "-mbmi2", "-mlzcnt"], ["CPU_CAPABILITY=AVX512", "CPU_CAPABILITY_AVX512"], ["PYATTN_VNNI_TILES"]),
        "avx512_bf16": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma",
                         "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
                        ["CPU_CAPABILITY=AVX512", "CPU_CAPABILITY_AVX512"], ["PYATTN_VNNI_TILES"]),
    },
    "aarch64": {
        "default": ([], ["CPU_CAPABILITY=DEFAULT"], []),  # NEON: every aarch64 CPU has it
        "sve256": (["-march=armv8.2-a+sve", "-msve-vector-bits=256"],
                   ["CPU_CAPABILITY=SVE256", "CPU_CAPABILITY_SVE", "CPU_CAPABILITY_SVE256"], []),
    },
}
KERNEL_SOURCES = ["csrc/cpu/fwd.cpp", "csrc/cpu/fwd_plan.cpp", "csrc/cpu/fwd_prefill.cpp", "csrc/cpu/fwd_decode.cpp",
                  "csrc/cpu/bwd.cpp", "csrc/cpu/module.cpp"]


def cpu_capabilities():
    caps = CPU_CAPABILITIES.get(platform.machine().lower(), {"default": ([], ["CPU_CAPABILITY=DEFAULT"], [])})
    wanted = [c for c in os.environ.get("PYATTN_CPU_CAPABILITIES", "").split(";") if c]
    unknown = sorted(set(wanted) - set(caps))
    if unknown:
        raise RuntimeError(f"PYATTN_CPU_CAPABILITIES names {unknown}; this machine's are {list(caps)}")
    return {name: flags for name, flags in caps.items() if not wanted or name in wanted}


def common_cxx():
    march = os.environ.get("PYATTN_CPU_ARCH")
    return ["-O3", "-std=c++17", "-fopenmp"] + ([f"-march={march}"] if march else [])


def cpu_kernel_extensions(caps):
    exts = []
    for name, (flags, capability, defines) in caps.items():
        macros = [f"-D{d}" for d in capability + defines] + [f'-DPYATTN_CPU_CAPABILITY_NAME="{name}"']
        # hidden: this module's inline functions, compiled for its ISA, never stand in for another module's
        cxx = common_cxx() + flags + macros + ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
        exts.append(CppExtension(f"pyattn._cpu_{name}", KERNEL_SOURCES, include_dirs=[os.path.join(ROOT, "csrc")],
                                 extra_compile_args={"cxx": cxx},
                                 extra_link_args=["-fopenmp", f"-Wl,--version-script={ROOT}/csrc/cpu/module.map"]))
    return exts


def extension(caps):
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc/*.cpp")) + glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))
    sources = [s for s in sources if s not in KERNEL_SOURCES]
    defines = [f'-DPYATTN_VERSION="{VERSION}"', f'-DPYATTN_TORCH_VERSION="{torch.__version__}"',
               f'-DPYATTN_CPU_CAPABILITIES="{";".join(caps)}"']
    cxx = common_cxx() + defines
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("pyattn._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources += rel(glob.glob(os.path.join(ROOT, "csrc/cuda/**/*.cu"), recursive=True))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc/cuda/**/*.cpp"), recursive=True))
    cuda_defines = ["-DPYATTN_WITH_CUDA", f'-DPYATTN_CUDA_ARCHS="{archs}"']
    with open(os.path.join(ROOT, "csrc/cuda/nvcc_flags.txt")) as f:  # shared with pyattn/cuda_aot.py
        flags = f.read().split()
    nvcc = [*flags, f"--threads={os.environ.get('NVCC_THREADS', '4')}", *defines, *cuda_defines]
    return CUDAExtension("pyattn._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


class Build(BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        # the CPU-capability modules compile the same sources with other flags: one object folder each
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


CAPS = cpu_capabilities()
setup(
    name="pyattn",
    version=VERSION,
    packages=["pyattn", "pyattn.distributed", "pyattn.integrations", "pyattn.kernels"],
    package_dir={"pyattn.kernels": "kernels"},
    ext_modules=[extension(CAPS), *cpu_kernel_extensions(CAPS)],
    cmdclass={"build_ext": Build},
)
