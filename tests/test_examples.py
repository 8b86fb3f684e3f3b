"""The examples run as scripts, as a user would run them, and do what they say."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
