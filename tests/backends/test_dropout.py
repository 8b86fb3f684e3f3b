"""Dropout in the fused CPU kernel: reproducible from torch.manual_seed, the mask it draws is the one
torch.ops.pyattn.cpu_dropout_mask reports, backward regenerates it, and its statistics are right."""
import pytest
import torch

import pyattn
from helpers import backend_params, dtype_id
from pyattn import ops
from pyattn.inputs import dense_inputs

pytestmark = pytest.mark.parametrize("backend,device", backend_params(["cpu"]))


def sdpa(backend, q, k, v, **kw):
    return pyattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)


def qkv(*shapes, dtype=torch.float32, requires_grad=False):
    return [torch.randn(s).to(dtype).requires_grad_(requires_grad) for s in shapes]


def seed_offset(q, k, v, seed, **kw):
    """The (seed, offset) the forward draws after torch.manual_seed(seed): the same call it makes."""
    inp = dense_inputs(q, k, v, attn_mask=kw.pop("attn_mask", None), dropout_p=kw.pop("dropout_p"),
                       is_causal=kw.pop("is_causal", False), enable_gqa=kw.pop("enable_gqa", False))
    torch.manual_seed(seed)
    return inp, ops.draw_rng_state(inp).tolist()


def keep_mask(inp, seed, offset):
    B, H, L = inp.q.shape[:3]
    keep = torch.ops.pyattn.cpu_dropout_mask(B, H, L, inp.k.shape[2], inp.dropout_p, seed, offset)
    assert keep.dtype == torch.bool and keep.shape == (B, H, L, inp.k.shape[2])
    return keep


def explicit(q, k, v, keep, p, is_causal=False, attn_mask=None):
    """softmax(scale q k^T) * keep / (1 - p) @ v, float64, differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    if q.shape[1] != k.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    L, S = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(s, -1).nan_to_num(0.0)
    return (probs * keep / (1 - p)) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_same_seed_is_bitwise_reproducible(backend, device, dtype):
    q, k, v = qkv((2, 3, 33, 16), (2, 3, 65, 16), (2, 3, 65, 16), dtype=dtype, requires_grad=True)
    results = []
    for _ in range(2):
        torch.manual_seed(1234)
        out = sdpa(backend, q, k, v, dropout_p=0.3, is_causal=True)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_different_seeds_differ(backend, device):
    q, k, v = qkv((1, 2, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16))
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(sdpa(backend, q, k, v, dropout_p=0.3))
    assert not torch.equal(outs[0], outs[1])
    # and two calls in a row (no re-seed) differ too: the generator advances
    torch.manual_seed(1)
    a, b = sdpa(backend, q, k, v, dropout_p=0.3), sdpa(backend, q, k, v, dropout_p=0.3)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("setup", ["plain", "causal", "gqa", "boolmask", "L!=S"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_output_and_grads_use_the_reported_mask(backend, device, setup, p):
    """out == softmax(s) * keep / (1 - p) @ v with keep = cpu_dropout_mask(seed, offset); backward regenerates keep:
    the grads equal autograd's through that formula."""
    hkv = 1 if setup == "gqa" else 2
    S = 17 if setup == "L!=S" else 33
    q, k, v = qkv((2, 2, 33, 16), (2, hkv, S, 16), (2, hkv, S, 16), requires_grad=True)
    kw = dict(dropout_p=p, is_causal=setup == "causal", enable_gqa=setup == "gqa")
    if setup == "boolmask":
        kw["attn_mask"] = torch.rand(2, 1, 33, S) > 0.3
    inp, (seed, offset) = seed_offset(q, k, v, 77, **dict(kw))
    torch.manual_seed(77)
    out = sdpa(backend, q, k, v, **kw)
    keep = keep_mask(inp, seed, offset)
    assert 0 < keep.float().mean() < 1
    exp = explicit(q, k, v, keep, p, kw["is_causal"], kw.get("attn_mask"))
    torch.testing.assert_close(out.double(), exp, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exp_grads = torch.autograd.grad(exp, (q, k, v), dout.double())
    for name, g, e in zip("qkv", grads, exp_grads):
        torch.testing.assert_close(g.double(), e.double(), atol=5e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_keep_fraction(backend, device):
    """A large mask keeps 1 - p of its entries within a few standard deviations; heads and rows are not copies."""
    B, H, L, S, p = 2, 4, 128, 256, 0.3
    keep = torch.ops.pyattn.cpu_dropout_mask(B, H, L, S, p, 12345, 678)
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, f"keep fraction {frac} vs {1 - p} (sigma {sigma:.2g})"
    # independence: two heads (and two rows) agree at p^2 + (1-p)^2, as independent draws do
    agree = (keep[:, 0] == keep[:, 1]).float().mean().item()
    expected = p * p + (1 - p) * (1 - p)
    assert abs(agree - expected) < 0.02, f"heads 0 and 1 agree on {agree}, independent draws would on {expected}"
    agree_rows = (keep[:, :, 0::2] == keep[:, :, 1::2]).float().mean().item()
    assert abs(agree_rows - expected) < 0.02
    # same (seed, offset) -> same mask; another seed or offset -> another mask
    assert torch.equal(keep, torch.ops.pyattn.cpu_dropout_mask(B, H, L, S, p, 12345, 678))
    assert not torch.equal(keep, torch.ops.pyattn.cpu_dropout_mask(B, H, L, S, p, 12346, 678))
    assert not torch.equal(keep, torch.ops.pyattn.cpu_dropout_mask(B, H, L, S, p, 12345, 679))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.9])
def test_keep_fraction_extremes(backend, device, p):
    keep = torch.ops.pyattn.cpu_dropout_mask(1, 2, 64, 256, p, 5, 0)
    frac = keep.float().mean().item()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(frac - (1 - p)) <= 5 * sigma + 1e-9


def test_expectation_over_seeds(backend, device):
    """E[out] over seeds is the no-dropout output (dropout is unbiased)."""
    q, k, v = qkv((1, 1, 8, 16), (1, 1, 16, 16), (1, 1, 16, 16))
    ref = sdpa(backend, q, k, v)
    outs = []
    for seed in range(400):
        torch.manual_seed(seed)
        outs.append(sdpa(backend, q, k, v, dropout_p=0.2))
    outs = torch.stack(outs)
    mean, stderr = outs.mean(0), outs.std(0) / len(outs) ** 0.5
    z = ((mean - ref).abs() / (stderr + 1e-6)).max().item()
    assert z < 5.5, f"mean over seeds is {z:.1f} standard errors from the no-dropout output"


def test_dropout_varlen_reproducible(backend, device):
    q, k, v = qkv((40, 2, 16), (30, 2, 16), (30, 2, 16), requires_grad=True)
    cu_q = torch.tensor([0, 7, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 30], dtype=torch.int32)
    res = []
    for _ in range(2):
        torch.manual_seed(9)
        out = pyattn.varlen_attention(q, k, v, cu_q, cu_k, 33, 20, dropout_p=0.4, is_causal=True, backend=backend)
        res.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*res):
        assert torch.equal(a, b)
    no_drop = pyattn.varlen_attention(q, k, v, cu_q, cu_k, 33, 20, is_causal=True, backend=backend)
    assert not torch.equal(res[0][0], no_drop)


def test_dropout_one_gives_zeros(backend, device):
    """dropout_p == 1 drops everything: zeros, as torch (the fused kernel leaves it to torch under auto)."""
    q, k, v = qkv((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=1.0), out)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.1"], ids=str)
def test_dropout_out_of_range(backend, device, p):
    q, k, v = qkv((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(backend, q, k, v, dropout_p=p)


def test_varlen_uses_the_reported_mask(backend, device):
    """Varlen draws keep[b, h, i, j] with b the sequence and i, j local to it (csrc/cpu/philox.h):
    cpu_dropout_mask(batch, Hq, max_seqlen_q, max_seqlen_k) holds every sequence's mask in its corner."""
    lens_q, lens_k, p = (7, 33, 5), (20, 10, 9), 0.3
    q, k, v = qkv((45, 4, 16), (39, 2, 16), (39, 2, 16), requires_grad=True)
    cu_q = torch.tensor([0, 7, 40, 45], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 30, 39], dtype=torch.int32)
    torch.manual_seed(5)
    out = pyattn.varlen_attention(q, k, v, cu_q, cu_k, 33, 20, dropout_p=p, is_causal=True, backend=backend)
    torch.manual_seed(5)
    seed, offset = torch.randint(0, 2**62, (2,)).tolist()  # what ops.draw_rng_state does
    keep = torch.ops.pyattn.cpu_dropout_mask(3, 4, 33, 20, p, seed, offset)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for b in range(3):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (x.transpose(0, 1)[None] for x in (q[sq], k[sk], v[sk]))
        exp = explicit(qb, kb, vb, keep[b:b + 1, :, :lens_q[b], :lens_k[b]], p, is_causal=True)
        torch.testing.assert_close(out[sq].double(), exp[0].transpose(0, 1), atol=2e-5, rtol=1e-4)
        exp_grads = torch.autograd.grad(exp, (q, k, v), dout[sq].transpose(0, 1)[None].double())
        for name, g, e, rows in zip("qkv", grads, exp_grads, (sq, sk, sk)):
            torch.testing.assert_close(g[rows].double(), e[rows].double(), atol=5e-5, rtol=1e-4,
                                       msg=lambda m: f"sequence {b}, grad of {name}: {m}")
