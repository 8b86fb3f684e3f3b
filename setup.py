"""Builds pyattn._C: op schemas and the fused CPU kernel always; CUDA kernels when nvcc and a CUDA torch exist.

Hermetic: no downloads, no git. Environment switches:
  PYATTN_SKIP_CUDA_BUILD=1   never build CUDA sources
  PYATTN_FORCE_CUDA=1        build them even when no GPU is visible (needs nvcc and a CUDA torch)
  TORCH_CUDA_ARCH_LIST       defaults to the visible GPUs, else "8.0;9.0"; 9.0 is built as sm_90a
  PYATTN_CPU_ARCH            -march for the CPU kernel (default: native; the build machine's ISA)
  MAX_JOBS, NVCC_THREADS     build parallelism
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


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


def extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc/*.cpp")) + glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))
    march = os.environ.get("PYATTN_CPU_ARCH", "native")
    defines = [f'-DPYATTN_VERSION="{VERSION}"', f'-DPYATTN_TORCH_VERSION="{torch.__version__}"']
    cxx = ["-O3", "-std=c++17", f"-march={march}", "-fopenmp", *defines]
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


setup(
    name="pyattn",
    version=VERSION,
    packages=["pyattn", "pyattn.integrations", "pyattn.kernels"],
    package_dir={"pyattn.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
