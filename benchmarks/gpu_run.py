"""What the GPU-machine drivers (gpu_check, gpu_profile) share: subprocesses that a deadline can end, the tree's
commit without git, and test counts from pytest's output."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(cmd, env=None):
    """Popen with its output in a temporary file (pipes would stall one run while another is waited on), in its own
    process group: a timeout then also ends pytest-xdist's workers and the compilers under setup.py."""
    out = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    return proc, out


def wait(started, deadline):
    """-> (returncode, output, seconds until it ended); 124 where it was killed at deadline."""
    proc, out = started
    try:
        rc = proc.wait(timeout=max(deadline - time.time(), 5))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
    ended = time.time()
    out.seek(0)
    return rc, out.read(), ended


def commit():
    head = os.path.join(ROOT, ".git", "HEAD")
    try:  # read .git directly: the GPU machine's copy of the tree may have no git binary or history
        ref = open(head).read().strip()
        if ref.startswith("ref: "):
            return open(os.path.join(ROOT, ".git", ref[5:])).read().strip()
        return ref
    except OSError:
        return "unknown"


def has_cuda_build():
    """Whether this tree's pyattn._C holds the CUDA C++ backend (asked in a fresh process: importing it here would
    keep a stale build loaded)."""
    code = "import pyattn._C as c; print('cuda' in c.build_info()['backends'])"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return False
    return out.strip() == "True"


# pytest's closing line ("3 failed, 40 passed, 2 skipped in 61.02s"), and pytest -q's progress lines: one mark a
# test as its result arrives, so they are what a run killed at the deadline leaves behind
SUMMARY_LINE = re.compile(r"(?:\d+ \w+|no tests ran)(?:, \d+ \w+)* in \d+(?:\.\d+)?s")
PROGRESS_LINE = re.compile(r"^[.FEsxX]+ *(?:\[ *\d+%\])?$")
OUTCOMES = {"passed": "passed", "failed": "failed", "error": "failed", "errors": "failed", "skipped": "skipped"}
MARK_OUTCOMES = {".": "passed", "F": "failed", "E": "failed", "s": "skipped"}  # x, X (xfail, xpass): neither


def pytest_counts(pytest_output):
    """{passed, failed, skipped (errors count as failed), counted_from}: from pytest's summary where the run
    finished, else from its progress marks, so that a run cut off at the deadline records the tests that ran."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    lines = pytest_output.splitlines()
    summary = [ln for ln in lines if SUMMARY_LINE.search(ln)]
    if summary:
        for n, word in re.findall(r"(\d+) (\w+)", summary[-1]):
            if word in OUTCOMES:
                counts[OUTCOMES[word]] += int(n)
        return {**counts, "counted_from": "summary line"}
    for line in filter(PROGRESS_LINE.match, lines):
        for mark in line.split(" ")[0]:
            if mark in MARK_OUTCOMES:
                counts[MARK_OUTCOMES[mark]] += 1
    return {**counts, "counted_from": "progress marks: the run ended before its summary"}
