"""Read a cubin without a GPU: registers, local memory and tensor-core opcodes, via the cuobjdump that
Triton's package ships (or the CUDA toolkit's)."""
import collections
import os
import re
import shutil
import subprocess
import tempfile

TENSOR_CORE_OPS = re.compile(r"\b(HGMMA|HMMA|IMMA|HQMMA|UTCHMMA|UTCQMMA)(\.[0-9A-Za-z_]+)*")
ASYNC_COPY_OPS = re.compile(r"\b(LDGSTS|UTMALDG)\b")  # cp.async (pipelined loads) and TMA loads
RESOURCES = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


class MissingTool(RuntimeError):
    """A tool or source the ahead-of-time compile needs is absent (nvcc, cuobjdump, a source checkout)."""


def cuobjdump():
    """Path of a cuobjdump: Triton's copy first, so CPU-only machines without a CUDA toolkit have one."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if not found:
        raise MissingTool("pyattn.inspect needs cuobjdump: install triton or put the CUDA toolkit on PATH")
    return found


def _dump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump(), *flags, f.name], check=True, capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}} from `cuobjdump -res-usage`."""
    usage, name = {}, None
    for line in _dump(cubin, "-res-usage").splitlines():
        line = line.strip()
        if line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif name and line.startswith("REG:"):
            usage[name] = {k: int(v) for k, v in RESOURCES.findall(line)}
    return usage


def opcode_counts(cubin: bytes, function: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Counts in the SASS of tensor-core instructions, by opcode (HGMMA) and by full form
    (HGMMA.64x128x16.F32.BF16, which shows tile shape and types), and of asynchronous copies."""
    text = _dump(cubin, "-sass", "-fun", function)
    found = list(TENSOR_CORE_OPS.finditer(text))
    by_opcode = collections.Counter(m.group(1) for m in found)
    by_form = collections.Counter(m.group(0) for m in found)
    copies = collections.Counter(m.group(1) for m in ASYNC_COPY_OPS.finditer(text))
    return dict(sorted(by_opcode.items())), dict(sorted(by_form.items())), dict(sorted(copies.items()))


def report(cubin: bytes, function: str, dynamic_shared: int = 0, usage=None) -> dict:
    """Resources of one kernel function. Spilled registers live in per-thread local memory (the stack frame),
    so spill_bytes is STACK + LOCAL: zero means the kernel stays in registers."""
    usage = usage or resource_usage(cubin)  # callers reading several functions pass it once
    if function not in usage:
        raise RuntimeError(f"function {function!r} not in cubin (has {sorted(usage)})")
    res = usage[function]
    by_opcode, by_form, copies = opcode_counts(cubin, function)
    return {"registers": res["REG"], "spill_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
            "shared_bytes": res.get("SHARED", 0) + dynamic_shared, "sass": by_opcode, "sass_forms": by_form,
            "async_copies": copies}
