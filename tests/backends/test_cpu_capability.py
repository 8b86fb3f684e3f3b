"""The CPU kernel's builds per CPU capability: which one runs, the switches that hold it lower, what build_info()
and explain() say, and that each build keeps its ISA to itself. (Each build's numerics run the whole CPU grid
through helpers.backend_params' cpu-<capability> parameters.)"""
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import pyattn
from pyattn import cpu_capability

requires_cpu = pytest.mark.skipif("cpu" not in pyattn.available_backends(), reason="pyattn._C is not built")
pytestmark = requires_cpu


def run_python(code, **env):
    """Runs code in a fresh interpreter with env added; -> stdout (stderr on failure in the assertion)."""
    full = {**os.environ, **env}
    for name in ("PYATTN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        if name not in env:
            full.pop(name, None)
    res = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip(), res.stderr


def best_capability():
    """What a fresh interpreter with no switch set runs: the highest compiled capability this CPU supports."""
    return [n for n in cpu_capability.order() if n in cpu_capability.compiled() and cpu_capability.cpu_supports(n)][-1]


def test_build_info_lists_capabilities():
    info = pyattn.build_info()
    assert info["cpu_capabilities"], info
    assert set(info["cpu_capabilities"]) <= set(cpu_capability.order())
    assert "default" in info["cpu_capabilities"]  # the portable baseline is always built
    assert info["cpu_capability"] in info["cpu_capabilities"]
    assert cpu_capability.cpu_supports(info["cpu_capability"])


@pytest.mark.subprocess
def test_best_capability_is_chosen():
    """With no switch set, the highest compiled capability this CPU supports runs."""
    code = "import pyattn; print(pyattn.build_info()['cpu_capability'])"
    out, _ = run_python(code)
    assert out == best_capability()


@pytest.mark.parametrize("variable", ["PYATTN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"])
@pytest.mark.subprocess
def test_environment_holds_it_lower(variable):
    code = ("import torch, pyattn; q = torch.randn(1, 2, 9, 8); "
            "print(pyattn.build_info()['cpu_capability']); print(pyattn.explain(q, q, q))")
    out, _ = run_python(code, **{variable: "default"})
    name, explain = out.split("\n", 1)
    assert name == "default"
    if len(cpu_capability.compiled()) > 1 and cpu_capability.cpu_supports(cpu_capability.order()[1]):
        assert f"held back by {variable}=default" in explain, explain


@pytest.mark.subprocess
def test_unknown_capability_name_warns_and_is_ignored():
    out, err = run_python("import pyattn; print(pyattn.build_info()['cpu_capability'])", PYATTN_CPU_CAPABILITY="avx9")
    assert "PYATTN_CPU_CAPABILITY='avx9'" in err
    assert out == best_capability()  # not this process's: the switches that hold it lower are not passed on


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
@pytest.mark.subprocess
def test_bf16_runs_where_onednn_has_no_bf16_vnni(isa):
    """Where oneDNN has no bf16 VNNI brgemm, bf16 runs on fp32 tiles and explain says so. ONEDNN_MAX_CPU_ISA=AVX2
    (an AVX2-only CPU) makes torch's brgemm raise; AVX512_CORE (Skylake, Cascade Lake: AVX-512 without BF16) passes
    torch's check and oneDNN itself raises. Both once reached the caller. Head dim 20, not a whole number of vectors:
    the decode takes the matmul path too, not decode_rows.h's."""
    code = ("import torch, pyattn; torch.manual_seed(0); q, k, v = torch.randn(3, 2, 3, 40, 20).bfloat16(); "
            "out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True); "
            "ref = torch.nn.functional.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True); "
            "kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(); "
            "dec = pyattn.kvcache_attention(q.transpose(1, 2)[:, -1:], kc, vc, "
            "cache_seqlens=torch.full((2,), 40, dtype=torch.int32)); "
            "last = ref[:, :, -1:].transpose(1, 2); "
            "print(max(float((out.double() - ref).abs().max()), float((dec.double() - last).abs().max()))); "
            "print(pyattn.explain(q, k, v))")
    out, _ = run_python(code, ONEDNN_MAX_CPU_ISA=isa)
    err, explain = out.split("\n", 1)
    assert float(err) < 3e-2
    assert "fp32 tiles" in explain, explain


@pytest.mark.parametrize("call,plan", [
    ("sdpa-L300-gqa", "prefill: fp32 tiles of 40 x 18"),
    ("sdpa-L3-E20", "decode: fp32 tiles of 128 x 256, split-KV chunks of 1024 keys"),
    ("kvcache-decode-gqa", "decode: fp32 FMA on the cache's rows where they lie"),
    ("kvcache-L40-gqa", "prefill: fp32 tiles of 40 x 18"),
])
def test_explain_names_the_forward_plan(call, plan, monkeypatch):
    """explain() says how the CPU kernel would run the forward: decode or prefill by the rows a tile stacks (a GQA
    group's heads x L), on the cache's rows or on tiles, which tiles (PYATTN_CPU_FWD_TILE sets prefill's)."""
    monkeypatch.setenv("PYATTN_CPU_FWD_TILE", "40x18")
    if call.startswith("sdpa"):
        L, E = (300, 64) if "L300" in call else (3, 20)
        q, k = torch.randn(1, 8, L, E), torch.randn(1, 2, 50, E)
        text = pyattn.explain(q, k, k, enable_gqa=True, backend="cpu")
    else:
        L = 40 if "L40" in call else 1
        q, cache = torch.randn(2, L, 8, 128), torch.randn(2, 100, 2, 128)
        text = pyattn.explain(q, cache, cache, cache_seqlens=torch.tensor([10, 50], dtype=torch.int32),
                              backend="cpu")
    line = next(x for x in text.splitlines() if x.strip().startswith("cpu "))
    assert f"forward: {plan}" in line, text


def _amx():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read().split()
    except OSError:
        return False


@pytest.mark.parametrize("group", [6, 8])
def test_bf16_decode_rows_give_way_to_amx_tiles(group):
    """bf16 decode tiles of 7 or 8 rows run as bf16 VNNI tiles where those run on AMX (faster there), on the cache's
    rows elsewhere; 6 rows or fewer always on the rows."""
    q, cache = torch.randn(1, 1, 2 * group, 128, dtype=torch.bfloat16), torch.randn(1, 64, 2, 128, dtype=torch.bfloat16)
    text = pyattn.explain(q, cache, cache, cache_seqlens=32, backend="cpu")
    line = next(x for x in text.splitlines() if x.strip().startswith("cpu "))
    tiles = group > 6 and _amx() and cpu_capability.current() == "avx512_bf16" and torch.backends.mkldnn.enabled
    want = "decode: bf16 VNNI tiles of 128 x 256" if tiles else "decode: fp32 FMA on the cache's rows"
    assert want in line, text


def test_forced_switches_and_restores():
    before = cpu_capability.current()
    q = torch.randn(1, 2, 17, 8)
    with cpu_capability.forced("default"):
        assert pyattn.build_info()["cpu_capability"] == "default"
        assert "CPU capability default" in pyattn.explain(q, q, q)
        pyattn.scaled_dot_product_attention(q, q, q)
    assert cpu_capability.current() == before == pyattn.build_info()["cpu_capability"]


def test_use_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="not compiled"):
        cpu_capability.use("avx9")
    missing = [n for n in cpu_capability.compiled() if not cpu_capability.cpu_supports(n)]
    if missing:
        with pytest.raises(ValueError, match="cannot run"):
            cpu_capability.use(missing[0])


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
@pytest.mark.subprocess
def test_kernel_modules_export_only_their_init():
    """A capability module exports PyInit alone: no inline function compiled for its ISA (std:: templates included)
    can be bound by another module, so an AVX-512 copy never runs on an AVX2 CPU."""
    import importlib
    for name in cpu_capability.compiled():
        path = importlib.util.find_spec(f"pyattn._cpu_{name}").origin
        res = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
        symbols = [line.split()[-1] for line in res.stdout.splitlines() if line.split()[1:2] != ["A"]]
        assert symbols == [f"PyInit__cpu_{name}"], (name, symbols)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 prefetch instructions")
@pytest.mark.subprocess
def test_kernels_keep_their_prefetches():
    """The CPU kernel prefetches rows ahead of their use (paged V in pack_keys; decode's next rows in decode_rows.h).
    GCC 12 took helpers of nothing but prefetches for functions without effects and dropped their calls (decode
    10-40% slower, no error anywhere): the object code of every x86 capability must hold them."""
    import importlib
    for name in cpu_capability.compiled():
        path = importlib.util.find_spec(f"pyattn._cpu_{name}").origin
        code = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                              check=True).stdout
        prefetches, function = {}, ""
        for line in code.splitlines():
            if line.endswith(">:"):
                function = line
            elif "prefetch" in line:
                prefetches[function] = prefetches.get(function, 0) + 1
        where = lambda part: sum(n for f, n in prefetches.items() if part in f)  # noqa: E731
        assert where("pack_keys") >= 1, (name, "no prefetch of paged rows in pack_keys (fwd.cpp prefetch_rows)")
        assert where("decode_rows_") >= 8, (name, "no prefetch in decode_rows.h's kernels")
