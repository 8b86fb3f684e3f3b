"""The shared test library: backends under test (backends), the tolerance rule (tolerance), the case catalogue
(cases), random inputs built alike in many files (inputs). Tests import from here (`from helpers import ...`);
tests/conftest.py holds only fixtures and hooks."""
import os

import torch

# before triton is imported: no GPU -> the Triton kernels run on CPU tensors under the interpreter
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from .backends import (BACKEND_DTYPES, BACKENDS, FUSED, TORCH_SDPA, PyattnOps, backend_device,  # noqa: E402
                       backend_params, default_dtype, device_params, half_dtype, lower_cpu_capabilities, on_device,
                       sdpa_on)
from .cases import CASES, Case, attn_inputs, fwd_args, leaf, sample_inputs  # noqa: E402
from .inputs import paged_caches, qkv  # noqa: E402
from .tolerance import ATOL, FACTOR, assert_close_to_oracle, check_fwd_bwd, dtype_id, run_fwd_bwd  # noqa: E402

__all__ = ["ATOL", "BACKENDS", "BACKEND_DTYPES", "CASES", "Case", "FACTOR", "FUSED", "PyattnOps", "TORCH_SDPA",
           "assert_close_to_oracle", "attn_inputs", "backend_device", "backend_params", "check_fwd_bwd",
           "default_dtype", "device_params", "dtype_id", "fwd_args", "half_dtype", "leaf", "lower_cpu_capabilities",
           "on_device", "paged_caches", "qkv", "run_fwd_bwd", "sample_inputs", "sdpa_on"]
