#!/usr/bin/env bash
# make sdist-check: builds the sdist, installs it (pip, build isolation, as a user would) into a fresh venv that
# cannot see this tree or its dev install, and runs a smoke test from outside the tree. Minutes: it compiles
# pyattn._C and every CPU-capability module (PYATTN_CPU_CAPABILITIES=default builds one, for a quicker check).
# Offline: torch, numpy, pybind11 and the build requirements come from pip's configured local index/wheel cache.
# Usage: tools/sdist_check.sh [WORKDIR]   (PYTHON: the interpreter with `build`; default python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${1:-$(mktemp -d /tmp/pyattn-sdist.XXXXXX)}
mkdir -p "$WORK"
pin() { grep -E "^$1==" "$ROOT/requirements.txt"; }

echo "== sdist -> $WORK/dist"
rm -rf "$WORK/dist"
(cd "$ROOT" && "$PY" -m build --sdist --outdir "$WORK/dist" .)
SDIST=$(ls "$WORK"/dist/pyattn-*.tar.gz)

echo "== fresh venv (no system site-packages) with the pinned torch, numpy"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "$(pin torch)" "$(pin numpy)"

echo "== pip install $SDIST"
PYATTN_SKIP_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install --quiet "$SDIST"

echo "== smoke test (from $WORK: the source tree is not importable)"
cd "$WORK"
"$VPY" - <<'PY'
import os

import torch

import pyattn

here = os.path.dirname(pyattn.__file__)
assert "site-packages" in here, f"pyattn imported from {here}, not from the installed sdist"
info = pyattn.build_info()
print("pyattn", info["version"], "from", here, "| backends:", pyattn.available_backends(), "| cpu:",
      info["cpu_capability"], "of", info["cpu_capabilities"])
assert "cpu" in pyattn.available_backends(), pyattn.available_backends()
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 33, 64, requires_grad=True) for _ in range(3))
out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
out.sum().backward()
assert q.grad is not None and torch.isfinite(q.grad).all()
cu = torch.tensor([0, 5, 12], dtype=torch.int32)
packed = torch.randn(12, 4, 32)
assert pyattn.varlen_attention(packed, packed, packed, cu, cu, 7, 7, is_causal=True, backend="cpu").shape == (12, 4, 32)
cache = torch.zeros(2, 16, 2, 32)
out = pyattn.kvcache_attention(torch.randn(2, 1, 4, 32), cache, cache.clone(), k_new=torch.randn(2, 1, 2, 32),
                               v_new=torch.randn(2, 1, 2, 32), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32),
                               backend="cpu")
assert out.shape == (2, 1, 4, 32)
print(pyattn.explain(q, k, v, is_causal=True).splitlines()[1])
import pyattn.distributed, pyattn.flash_attn, pyattn.kernels  # noqa: E401,F401  (installed subpackages)
print("sdist smoke test: ok")
PY
