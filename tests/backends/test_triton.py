"""The Triton backend beyond the shared suites: its ops (opcheck), the TMA load path, dropout (reproducible,
and the backward regenerates the forward's mask), and what explain() says about it. Runs on CUDA, or on
CPU tensors under the interpreter."""
import pytest
import torch

import pyattn
from helpers import CASES, assert_close_to_oracle, attn_inputs, backend_params, check_fwd_bwd, fwd_args, sample_inputs
from pyattn.kernels import configs
from pyattn.op_args import BwdArgs, FwdArgs, pick

pytestmark = pytest.mark.parametrize("backend,device", backend_params(["triton"]))

OPCHECK_CASES = sample_inputs(cases=[c for c in CASES if c.id in (
    "causal-L33-S65", "floatmask-B1LS-grad", "gqa-Hq6-Hkv2", "combo-window-softcap-alibi-gqa-mask",
    "decode-L1-S1100-gqa-floatmask", "varlen-causal-br-gqa")])


def on(device, t):
    return {n: x.to(device) for n, x in t.items()}


@pytest.mark.parametrize("case,dtype", OPCHECK_CASES)
def test_opcheck(backend, device, case, dtype):
    inp = attn_inputs(case, on(device, case.make()))
    args = fwd_args(inp, True, case.mask_grad)
    torch.library.opcheck(torch.ops.pyattn.triton_fwd.default, args)
    out, lse = torch.ops.pyattn.triton_fwd(*args)
    fwd = FwdArgs(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    bwd = pick(BwdArgs, fwd, dout=torch.randn_like(out), out=out.detach(), lse=lse.detach(), dlse=None,
               mask_grad=case.mask_grad)
    torch.library.opcheck(torch.ops.pyattn.triton_bwd.default, bwd)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_path(backend, device, causal, monkeypatch):
    """K/V through tensor descriptors (sm_90 on a GPU; forced under the interpreter) matches the oracle."""
    if device == "cpu":
        monkeypatch.setattr(configs, "TMA_IN_INTERPRETER", True)
    q, k, v = (torch.randn(1, 2, n, 32, device=device, dtype=torch.float16) for n in (40, 70, 70))
    from pyattn.kernels.launch import _tma_ok
    cc = 0 if device == "cpu" else configs.arch(torch.cuda.current_device())
    assert _tma_ok(cc, k, v) == (device == "cpu" or cc >= 90)
    out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    oracle = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    base = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    assert_close_to_oracle("out", out, base.half(), oracle, torch.float16)


def dropout_call(backend, q, k, v, seed, p=0.3, **kw):
    torch.manual_seed(seed)
    return pyattn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend, **kw)


def test_dropout_reproducible(backend, device):
    q, k, v = (torch.randn(1, 2, n, 16, device=device) for n in (20, 40, 40))
    a, b, c = (dropout_call(backend, q, k, v, s, is_causal=True) for s in (1, 1, 2))
    assert torch.equal(a, b), "same torch.manual_seed, different output"
    assert not torch.equal(a, c), "different seeds, same output"


def test_dropout_unbiased(backend, device):
    """E[dropout output] = output without dropout: the mean over many seeds converges to it."""
    q, k, v = (torch.randn(1, 1, n, 16, device=device) for n in (8, 24, 24))
    mean = torch.stack([dropout_call(backend, q, k, v, s) for s in range(200)]).mean(0)
    exact = pyattn.scaled_dot_product_attention(q, k, v, backend=backend)
    assert (mean - exact).abs().max() < 0.15, (mean - exact).abs().max()


def test_dropout_backward_matches_finite_differences(backend, device):
    """With the seed fixed the output is a smooth function of q, k, v: the backward must regenerate the very
    mask the forward drew, or the directional derivative disagrees with finite differences."""
    q, k, v = (torch.randn(1, 2, n, 16, device=device, dtype=torch.float32) for n in (12, 20, 20))
    dirs = [torch.randn_like(t) for t in (q, k, v)]
    w = torch.randn(1, 2, 12, 16, device=device)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    (dropout_call(backend, *args, seed=7) * w).sum().backward()
    predicted = sum((a.grad * d).sum() for a, d in zip(args, dirs)).item()
    eps = 1e-2
    f = [(dropout_call(backend, *(t + s * eps * d for t, d in zip((q, k, v), dirs)), seed=7) * w).sum().item()
         for s in (1, -1)]
    numeric = (f[0] - f[1]) / (2 * eps)
    assert abs(numeric - predicted) <= 2e-2 * max(1.0, abs(numeric)), (numeric, predicted)


def test_explain(backend, device):
    q = torch.randn(1, 2, 8, 16, device=device)
    triton_line = next(line for line in pyattn.explain(q, q, q, is_causal=True).splitlines()
                       if line.strip().startswith("triton"))
    if device == "cpu":  # auto never picks the interpreter; it still says why bf16 cannot run there
        assert "can run" in triton_line, triton_line
        bf = q.to(torch.bfloat16)
        assert "bfloat16 runs on CUDA only" in pyattn.explain(bf, bf, bf, backend=backend)
        with pytest.raises(RuntimeError, match="bfloat16"):
            pyattn.scaled_dot_product_attention(bf, bf, bf, backend=backend)
    else:
        assert "chosen" in triton_line, triton_line


def test_autotuned_launches(backend, device, monkeypatch):
    """The autotuned forward, dK/dV and dQ launches (what long sequences take; here forced for a short one) run
    every candidate config and give the right answer. Under the interpreter a stand-in timer runs each once."""
    from pyattn.kernels import launch
    monkeypatch.setattr(configs, "AUTOTUNE_IN_INTERPRETER", True)
    monkeypatch.setattr(configs, "AUTOTUNE_FROM", 0)
    n = 70
    launch._tuned.cache_clear()
    timed = []
    if device == "cpu":
        for name in launch.TUNED:
            launch._tuned(name, 0)._do_bench = lambda kernel_call, quantiles: (kernel_call(), timed.append(1),
                                                                                [1.0] * 3)[2]
    try:
        t = {name: torch.randn(1, 2, m, 32, device=device) for name, m in (("q", n), ("k", n + 20), ("v", n + 20))}
        sdpa = torch.nn.functional.scaled_dot_product_attention
        check_fwd_bwd(lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend),
                      lambda q, k, v: sdpa(q, k, v, is_causal=True), lambda q, k, v: sdpa(q, k, v, is_causal=True),
                      t, torch.float16, out_names=("out",))
        q, k, v = t["q"], t["k"], t["v"]
        cc = 0 if configs.INTERPRET else configs.arch(q.device.index or 0)  # the launcher's key for its autotuners
        assert all(launch._tuned(name, cc).cache for name in launch.TUNED), "a kernel skipped its autotuner"
        assert device != "cpu" or len(timed) >= 3 * 4, f"only {len(timed)} configs were timed"
    finally:
        launch._tuned.cache_clear()
