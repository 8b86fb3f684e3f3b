"""Peak extra host memory of one CPU benchmark point, measured in a child process.

The parent cannot reset its own peak RSS, so each point runs in a fresh interpreter:
`python -m benchmarks.memory IMPL DTYPE B H L S D CAUSAL PASS` prints the JSON {"peak_extra_bytes": n}.
"""
import json
import subprocess
import sys

import torch

from . import measure
from .impls import implementations
from .sweep import DTYPES


def measure_in_child(p):
    args = [p.impl, p.dtype, p.B, p.H, p.L, p.S, p.D, int(p.causal), p.pass_]
    res = subprocess.run([sys.executable, "-m", "benchmarks.memory", *map(str, args)], capture_output=True,
                         text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main(argv):
    impl, dtype, B, H, L, S, D, causal, pass_ = argv
    B, H, L, S, D, causal = int(B), int(H), int(L), int(S), int(D), bool(int(causal))
    fn = implementations("cpu")[impl][1]
    shape = lambda n: (B, H, n, D)  # noqa: E731
    q, k, v = (torch.randn(shape(n), dtype=DTYPES[dtype]) for n in (L, S, S))
    # warm the allocator and code paths on a tiny problem so only the big call's memory counts
    small = [t[..., :64, :].clone() for t in (q, k, v)]
    measure.make_step(fn, *small, causal, pass_)()
    before = measure.current_rss_bytes()
    measure.reset_peak_rss()
    measure.make_step(fn, q, k, v, causal, pass_)()
    print(json.dumps({"peak_extra_bytes": max(0, measure.cpu_peak_rss_bytes() - before)}))


if __name__ == "__main__":
    main(sys.argv[1:])
