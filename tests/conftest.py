"""pytest fixtures and hooks only; the shared test library is tests/helpers (import from `helpers`)."""
import getpass
import os
import tempfile

# Inductor's on-disk cache does not key its C++ kernels by ATEN_CPU_CAPABILITY: a kernel compiled for AVX-512 and
# reused by a run held to avx2 (or back) computes wrong values or corrupts memory (torch 2.13, seen in
# test_compiled_decode_step_matches_eager). A held run keeps its own cache.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest
import torch

from helpers import BACKEND_DTYPES, FUSED, backend_device  # sets TRITON_INTERPRET before triton is imported

import pyattn  # noqa: E402
from pyattn import cpu_capability  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_capability(request):
    """Runs a test marked cpu_capability(name) on the CPU kernels compiled for that capability."""
    mark = request.node.get_closest_marker("cpu_capability")
    if mark is None:
        yield
        return
    with cpu_capability.forced(mark.args[0]):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _backend_must_exist(request):
    """A parametrized backend whose device exists must be available: fail (never skip) when it is not built.
    Dtypes a backend declares it cannot take are skipped, saying why."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend in FUSED and backend not in pyattn.available_backends():
        from pyattn import ops
        pytest.fail(f"backend {backend!r} is required but not available (build pyattn._C: `make build`): "
                    f"{ops.load_error()}", pytrace=False)
    dtype = callspec.params.get("dtype") if callspec else None
    if isinstance(dtype, torch.dtype) and dtype not in BACKEND_DTYPES.get(backend, (dtype,)):
        why = " under the Triton interpreter" if backend == "triton" and backend_device(backend) == "cpu" else ""
        pytest.skip(f"backend {backend!r} does not take {dtype}{why}")


def pytest_collection_modifyitems(items):
    """Marks each test of the triton backend that runs under the Triton interpreter (no GPU) triton_interpreter:
    minutes on a CPU, so make test-quick leaves them out (-m "not triton_interpreter")."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec and callspec.params.get("backend") == "triton" and backend_device("triton") == "cpu":
            item.add_marker(pytest.mark.triton_interpreter)


def pytest_runtest_logreport(report):
    """PYATTN_FAILURE_LOG=path: each failure's report is appended to path as it happens (make gpu-check sets it),
    so a run killed at its deadline still leaves the failures it met; pytest-xdist's controller writes them."""
    path = os.environ.get("PYATTN_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
