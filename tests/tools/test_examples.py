"""The examples run as scripts, as a user would run them, and do what they say."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_tiny_gpt_learns():
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", run("tiny_gpt.py", "--steps", "41"))]
    assert len(losses) == 3 and losses[-1] < 0.6 * losses[0], losses


def test_generate_transformers_matches_eager():
    pytest.importorskip("transformers")
    assert "same tokens as eager attention: True" in run("generate_transformers.py")


def test_context_parallel_follows_one_process_loss_curve():
    """torchrun --nproc_per_node=2 examples/context_parallel.py: the sharded training's losses are the
    one-process run's (which rank 0 computes beside it), and it learns."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(EXAMPLES / "context_parallel.py"), "--steps", "41"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert result.returncode == 0, result.stdout + result.stderr
    pairs = [(float(a), float(b)) for a, b in re.findall(r"loss ([\d.]+) \(one process: ([\d.]+)\)", result.stdout)]
    assert len(pairs) == 3, result.stdout
    assert all(abs(a - b) <= 1e-3 for a, b in pairs), pairs
    assert pairs[-1][0] < 0.6 * pairs[0][0], pairs


def test_serve_paged_matches_one_request_at_a_time():
    """examples/serve_paged.py: continuous batching over a paged cache with a free-page pool (requests join and
    leave, pages are reused) generates the tokens each request gets alone with a contiguous cache."""
    out = run("serve_paged.py", "--requests", "6", "--pages", "20")
    assert "same tokens as one request at a time: True" in out, out
    assert int(re.search(r"up to (\d+);", out).group(1)) > 1, out
    assert int(re.search(r"(\d+) page allocations reused", out).group(1)) > 0, out
