"""`import pyattn` loads neither triton, pyattn's Triton kernels nor torch._dynamo (seconds of import time): they
come with the first Triton launch, torch.compile, or the user's own import of torch.nn.attention."""
import subprocess
import sys

import pytest


@pytest.mark.subprocess
def test_import_stays_light():
    probe = "import sys, pyattn; print(*(m in sys.modules for m in ('triton', 'pyattn.kernels', 'torch._dynamo')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["False", "False", "False"], dict(zip(("triton", "pyattn.kernels", "torch._dynamo"), loaded))
