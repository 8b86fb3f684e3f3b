"""The ops' host checks, written once (csrc/host_params.cpp): torch.ops.pyattn.fwd / bwd / kvcache_fwd (the C++ host,
csrc/cpu/attention.cpp) and their Triton twins triton_fwd / triton_bwd / triton_kvcache_fwd (which run the same checks
through pyattn._C before launching, csrc/host_checks.cpp), called directly with the same bad arguments, raise
RuntimeError with a message that starts with the host's tag and names the argument. pyattn's Python validation
(tests/api/test_errors.py) stops these inputs before the ops, so only direct callers of the ops (torch.library users,
export) reach these checks. The C++ CPU host here (the CUDA host shares its checks), and the Triton ops on their device
(CPU tensors under the interpreter)."""
import pytest
import torch

import pyattn  # noqa: F401  (loads pyattn._C and defines the Triton ops)
from helpers import backend_params
from pyattn.op_args import FwdArgs, KVCacheArgs

pytestmark = pytest.mark.parametrize("backend,device", backend_params(["cpu"], lower_capabilities=False)
                                     + backend_params(["triton"]))

R = torch.randn
# cases whose values inside tensors are wrong: hosts read those only from CPU tensors (on a GPU it would synchronize)
READS_VALUES = {"cu-seqlens-decreasing", "cu-seqlens-past-rows", "cu-seqlens-negative-start", "seqlens-past-capacity",
                "leftpad-past-seqlen", "batch-idx-out-of-range", "page-out-of-range", "paged-past-capacity"}


def tag(backend):
    return f"pyattn {backend}: "


def op(backend, name):
    """The backend's op for fwd, bwd or kvcache_fwd (the Triton ones are named triton_<name>)."""
    return getattr(torch.ops.pyattn, f"triton_{name}" if backend == "triton" else name)


def on(device, kwargs):
    """kwargs with their tensors on device, strides kept (block-table-strided needs its column stride)."""
    def move(t):
        if not isinstance(t, torch.Tensor) or t.device.type == device:
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)
    return {n: move(x) for n, x in kwargs.items()}


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def fwd_kwargs(**kw):
    """Valid fwd arguments by name (FwdArgs), with kw replacing some: q (2, 4, 5, 16), k (2, 2, 7, 16), v (2, 2, 7, 8),
    GQA 4:2."""
    args = FwdArgs(q=R(2, 4, 5, 16), k=R(2, 2, 7, 16), v=R(2, 2, 7, 8), mask=None, alibi_slopes=None,
                   cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=5, max_seqlen_k=7, scale=0.25, window_left=-1,
                   window_right=-1, bottom_right=False, softcap=0.0, dropout_p=0.0, rng_state=None, sinks=None)
    return args._replace(**kw)._asdict()


def varlen(**kw):
    """Packed: q 5 rows, k/v 7 rows in batch 1; two sequences."""
    return fwd_kwargs(**{**dict(q=R(1, 4, 5, 16), k=R(1, 2, 7, 16), v=R(1, 2, 7, 8), cu_seqlens_q=i32(0, 2, 5),
                                cu_seqlens_k=i32(0, 3, 7), max_seqlen_q=3, max_seqlen_k=4), **kw})


# (id, fwd arguments, substrings of the message)
FWD = [
    ("q-3d", fwd_kwargs(q=R(2, 4, 5)), ["q must be 4-D", "[2, 4, 5]"]),
    ("k-3d", fwd_kwargs(k=R(2, 7, 16)), ["k must be 4-D", "[2, 7, 16]"]),
    ("v-5d", fwd_kwargs(v=R(1, 2, 2, 7, 8)), ["v must be 4-D"]),
    ("q-int", fwd_kwargs(q=torch.zeros(2, 4, 5, 16, dtype=torch.int32)), ["q must be float32", "Int"]),
    ("dtype-mismatch", fwd_kwargs(k=R(2, 2, 7, 16, dtype=torch.float64)), ["q, k, v must share a dtype", "Double"]),
    ("batch-mismatch", fwd_kwargs(k=R(3, 2, 7, 16), v=R(3, 2, 7, 8)), ["batch of q", "[3, 2, 7, 16]"]),
    ("head-dim-mismatch", fwd_kwargs(k=R(2, 2, 7, 8)), ["head dim of q", "[2, 2, 7, 8]"]),
    ("kv-length-mismatch", fwd_kwargs(v=R(2, 2, 6, 8)), ["same heads and length", "[2, 2, 6, 8]"]),
    ("kv-heads-mismatch", fwd_kwargs(v=R(2, 1, 7, 8)), ["same heads and length", "[2, 1, 7, 8]"]),
    ("heads-not-multiple", fwd_kwargs(q=R(2, 3, 5, 16)), ["must be a multiple of heads of k", "[2, 3, 5, 16]"]),
    ("dropout-one", fwd_kwargs(dropout_p=1.0), ["dropout_p must be in [0, 1)", "1"]),
    ("dropout-negative", fwd_kwargs(dropout_p=-0.5), ["dropout_p must be in [0, 1)", "-0.5"]),
    ("softcap-negative", fwd_kwargs(softcap=-1.0), ["softcap must be >= 0", "-1"]),
    ("dropout-no-rng-state", fwd_kwargs(dropout_p=0.5), ["dropout_p > 0 needs rng_state"]),
    ("rng-state-int32", fwd_kwargs(dropout_p=0.5, rng_state=i32(1, 2)), ["rng_state must be int64", "Int"]),
    ("rng-state-3", fwd_kwargs(dropout_p=0.5, rng_state=torch.tensor([1, 2, 3])), ["rng_state must be int64", "[3]"]),
    ("mask-shape", fwd_kwargs(mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)),
     ["attn_mask must be a (B, Hq, L, S) = (2, 4, 5, 7)", "[2, 4, 5, 6]"]),
    ("mask-3d", fwd_kwargs(mask=torch.ones(4, 5, 7, dtype=torch.bool)), ["attn_mask must be a (B, Hq, L, S)"]),
    ("mask-int", fwd_kwargs(mask=torch.ones(2, 4, 5, 7, dtype=torch.int32)), ["attn_mask must be bool", "Int"]),
    ("mask-float64", fwd_kwargs(mask=R(2, 4, 5, 7, dtype=torch.float64)), ["attn_mask must be bool", "Double"]),
    ("alibi-1d", fwd_kwargs(alibi_slopes=R(4)), ["alibi_slopes must be float32 (B, Hq) = (2, 4)", "[4]"]),
    ("alibi-wrong-heads", fwd_kwargs(alibi_slopes=R(2, 2)), ["alibi_slopes must be float32 (B, Hq)", "[2, 2]"]),
    ("alibi-float64", fwd_kwargs(alibi_slopes=R(2, 4, dtype=torch.float64)), ["alibi_slopes", "Double"]),
    ("sinks-shape", fwd_kwargs(sinks=R(2)), ["sinks must be a contiguous (Hq,) = (4)", "[2]"]),
    ("sinks-2d", fwd_kwargs(sinks=R(1, 4)), ["sinks must be a contiguous (Hq,)", "[1, 4]"]),
    ("sinks-float16", fwd_kwargs(sinks=R(4, dtype=torch.float16)), ["sinks must be float32", "Half"]),
    ("sinks-float64-on-fp32", fwd_kwargs(sinks=R(4, dtype=torch.float64)), ["sinks must be float32", "Double"]),
    ("cu-seqlens-q-alone", fwd_kwargs(q=R(1, 4, 5, 16), k=R(1, 2, 7, 16), v=R(1, 2, 7, 8), cu_seqlens_q=i32(0, 5)),
     ["cu_seqlens_q and cu_seqlens_k must be given together"]),
    ("varlen-batch-2", fwd_kwargs(cu_seqlens_q=i32(0, 5), cu_seqlens_k=i32(0, 7)),
     ["must hold packed rows in batch 1", "[2, 4, 5, 16]"]),
    ("varlen-with-mask", varlen(mask=torch.ones(1, 4, 5, 7, dtype=torch.bool)),
     ["attn_mask is not supported with cu_seqlens"]),
    ("cu-seqlens-int64", varlen(cu_seqlens_q=torch.tensor([0, 2, 5])),
     ["cu_seqlens_q must be a contiguous 1-D int32 tensor", "Long"]),
    ("cu-seqlens-2d", varlen(cu_seqlens_k=i32(0, 3, 7).reshape(1, 3)),
     ["cu_seqlens_k must be a contiguous 1-D int32 tensor", "[1, 3]"]),
    ("cu-seqlens-empty", varlen(cu_seqlens_q=i32()), ["cu_seqlens_q must be a contiguous 1-D int32"]),
    ("cu-seqlens-sizes-differ", varlen(cu_seqlens_k=i32(0, 7)), ["must both have size batch + 1", "[3]", "[2]"]),
    ("cu-seqlens-decreasing", varlen(cu_seqlens_q=i32(0, 4, 3)), ["cu_seqlens_q must be non-decreasing"]),
    ("cu-seqlens-past-rows", varlen(cu_seqlens_k=i32(0, 3, 9)), ["cu_seqlens_k spans rows [0, 9)", "7 packed rows"]),
    ("cu-seqlens-negative-start", varlen(cu_seqlens_q=i32(-1, 2, 5)), ["cu_seqlens_q spans rows [-1, 5)"]),
    ("varlen-alibi-batch", varlen(alibi_slopes=R(1, 4)), ["alibi_slopes must be float32 (B, Hq) = (2, 4)"]),
]


def test_fwd_valid_arguments_run(backend, device):
    """The base arguments above are valid: each case fails for its own reason."""
    out, lse = op(backend, "fwd")(**on(device, fwd_kwargs()))
    assert out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5)
    out, lse = op(backend, "fwd")(**on(device, varlen()))
    assert out.shape == (1, 4, 5, 8)


def bwd_kwargs(backend, device, fwd=None, **kw):
    """Valid bwd arguments for fwd's (base: fwd_kwargs()) on device, with kw replacing some."""
    fwd = on(device, fwd or fwd_kwargs())
    out, lse = op(backend, "fwd")(**fwd)
    args = dict(dout=torch.randn_like(out), out=out, lse=lse, dlse=None, mask_grad=False, **fwd)
    args.update(on(device, kw))
    return args


BWD = [
    ("dout-shape", dict(dout=R(2, 4, 5, 16)), ["dout must have shape [2, 4, 5, 8]", "[2, 4, 5, 16]"]),
    ("dout-dtype", dict(dout=R(2, 4, 5, 8, dtype=torch.float64)), ["dout must be Float", "Double"]),
    ("out-shape", dict(out=R(2, 4, 4, 8)), ["out must have shape [2, 4, 5, 8]", "[2, 4, 4, 8]"]),
    ("out-dtype", dict(out=R(2, 4, 5, 8, dtype=torch.float16)), ["out must be Float", "Half"]),
    ("lse-shape", dict(lse=R(2, 4, 5, 1)), ["lse must have shape [2, 4, 5]", "[2, 4, 5, 1]"]),
    ("lse-dtype", dict(lse=R(2, 4, 5, dtype=torch.float64)), ["lse must be Float", "Double"]),
    ("dlse-shape", dict(dlse=R(2, 4)), ["dlse must have shape [2, 4, 5]", "[2, 4]"]),
    ("q-3d", dict(q=R(2, 4, 5)), ["q must be 4-D"]),
    ("dropout-one", dict(dropout_p=1.0), ["dropout_p must be in [0, 1)"]),
    ("softcap-negative", dict(softcap=-2.0), ["softcap must be >= 0"]),
    ("mask-shape", dict(mask=R(2, 4, 5, 5)), ["attn_mask must be a (B, Hq, L, S)", "[2, 4, 5, 5]"]),
]


def test_bwd_mask_grad_with_varlen(backend, device):
    with pytest.raises(RuntimeError) as info:
        op(backend, "bwd")(**bwd_kwargs(backend, device, varlen(), mask_grad=True))
    assert tag(backend) + "mask_grad is not supported with cu_seqlens" in str(info.value)


def test_bwd_valid_arguments_run(backend, device):
    dq, dk, dv, dmask = op(backend, "bwd")(**bwd_kwargs(backend, device))
    assert dq.shape == (2, 4, 5, 16) and dk.shape == (2, 2, 7, 16) and dv.shape == (2, 2, 7, 8)


def kv_kwargs(**kw):
    """Valid kvcache_fwd arguments by name (KVCacheArgs), with kw replacing some: q (2, 3, 4, 16), contiguous caches
    (2, 10, 2, 16|8), seqlens_k (5, 7)."""
    args = KVCacheArgs(q=R(2, 3, 4, 16), k_cache=R(2, 10, 2, 16), v_cache=R(2, 10, 2, 8), seqlens_k=i32(5, 7),
                       block_table=None, cache_batch_idx=None, cache_leftpad=None, alibi_slopes=None, sinks=None,
                       scale=0.25, window_left=-1, window_right=0, softcap=0.0)
    return args._replace(**kw)._asdict()


def paged(**kw):
    """Paged caches: 4 pages of 3 positions, two sequences of up to 2 pages each."""
    return kv_kwargs(**{**dict(k_cache=R(4, 3, 2, 16), v_cache=R(4, 3, 2, 8),
                               block_table=i32(0, 1, 2, 3).reshape(2, 2), seqlens_k=i32(5, 6)), **kw})


KVCACHE = [
    ("q-3d", kv_kwargs(q=R(2, 3, 16)), ["q must be 4-D", "[2, 3, 16]"]),
    ("k-cache-3d", kv_kwargs(k_cache=R(2, 10, 16)), ["k_cache must be 4-D"]),
    ("q-int", kv_kwargs(q=torch.zeros(2, 3, 4, 16, dtype=torch.int32)), ["q must be float32", "Int"]),
    ("dtype-mismatch", kv_kwargs(v_cache=R(2, 10, 2, 8, dtype=torch.float16)),
     ["q, k_cache, v_cache must share a dtype", "Half"]),
    ("head-dim-mismatch", kv_kwargs(k_cache=R(2, 10, 2, 8)), ["head dim of q", "[2, 10, 2, 8]"]),
    ("caches-differ", kv_kwargs(v_cache=R(2, 9, 2, 8)), ["must agree in all but the last dim", "[2, 9, 2, 8]"]),
    ("heads-not-multiple", kv_kwargs(k_cache=R(2, 10, 3, 16), v_cache=R(2, 10, 3, 8)),
     ["must be a multiple of heads of k_cache", "[2, 10, 3, 16]"]),
    ("softcap-negative", kv_kwargs(softcap=-1.0), ["softcap must be >= 0"]),
    ("seqlens-int64", kv_kwargs(seqlens_k=torch.tensor([5, 7])), ["seqlens_k must be a contiguous int32", "Long"]),
    ("seqlens-size", kv_kwargs(seqlens_k=i32(5, 7, 1)), ["seqlens_k must be a contiguous int32 tensor of shape (2)",
                                                        "[3]"]),
    ("leftpad-int64", kv_kwargs(cache_leftpad=torch.tensor([0, 1])), ["cache_leftpad must be a contiguous int32"]),
    ("batch-idx-size", kv_kwargs(cache_batch_idx=i32(0)), ["cache_batch_idx must be a contiguous int32", "[1]"]),
    ("fewer-rows-than-batch", kv_kwargs(k_cache=R(1, 10, 2, 16), v_cache=R(1, 10, 2, 8)),
     ["has fewer rows than the batch of q", "[1, 10, 2, 16]"]),
    ("seqlens-past-capacity", kv_kwargs(seqlens_k=i32(5, 11)), ["sequence 1 spans cache positions [0, 11)",
                                                                "capacity 10"]),
    ("leftpad-past-seqlen", kv_kwargs(cache_leftpad=i32(6, 0)), ["sequence 0 spans cache positions [6, 5)"]),
    ("batch-idx-out-of-range", kv_kwargs(cache_batch_idx=i32(0, 2)), ["cache_batch_idx[1] = 2", "2 rows"]),
    ("block-table-int64", paged(block_table=torch.tensor([[0, 1], [2, 3]])), ["block_table must be int32", "Long"]),
    ("block-table-batch", paged(block_table=i32(0, 1)), ["block_table must be int32 (B, max_pages) = (2, ...)", "[2]"]),
    ("block-table-strided", paged(block_table=i32(0, 9, 1, 9, 2, 9, 3, 9).reshape(2, 4)[:, ::2]),
     ["unit column stride"]),
    ("block-table-and-batch-idx", paged(cache_batch_idx=i32(0, 1)), ["cache_batch_idx is for contiguous caches"]),
    ("page-out-of-range", paged(block_table=i32(0, 1, 2, 4).reshape(2, 2)), ["block_table[1, 1] = 4",
                                                                             "4 pages"]),
    ("paged-past-capacity", paged(seqlens_k=i32(5, 7)), ["sequence 1 spans cache positions [0, 7)", "capacity 6"]),
    ("alibi-1d", kv_kwargs(alibi_slopes=R(4)), ["alibi_slopes must be float32 (B, Hq) = (2, 4)"]),
    ("sinks-shape", kv_kwargs(sinks=R(2)), ["sinks must be a contiguous (Hq,) = (4)"]),
]


def test_kvcache_fwd_valid_arguments_run(backend, device):
    for args in (kv_kwargs(), paged(), kv_kwargs(cache_batch_idx=i32(1, 0), cache_leftpad=i32(1, 2))):
        out, lse = op(backend, "kvcache_fwd")(**on(device, args))
        assert out.shape == (2, 3, 4, 8) and lse.shape == (2, 4, 3)


# (op, id, arguments or, for bwd, the fwd arguments to replace in bwd_kwargs(), substrings of the message)
CASES = [("fwd", *c) for c in FWD] + [("bwd", *c) for c in BWD] + [("kvcache_fwd", *c) for c in KVCACHE]


@pytest.mark.parametrize("name,case,kwargs,needles", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in CASES])
def test_host_checks(backend, device, name, case, kwargs, needles):
    if device != "cpu" and case in READS_VALUES:
        pytest.skip("the host reads tensor values only on the CPU")
    # bwd's valid out/lse come from running fwd
    args = bwd_kwargs(backend, device, **kwargs) if name == "bwd" else on(device, kwargs)
    with pytest.raises(RuntimeError) as info:
        op(backend, name)(**args)
    msg = str(info.value)
    assert tag(backend) in msg, msg
    for needle in needles:
        assert needle in msg, f"message {msg!r} does not mention {needle!r}"


def refusal(fn, args):
    with pytest.raises(RuntimeError) as info:
        fn(**args)
    return str(info.value)


# the hosts' q dtypes differ (the CPU kernels also take float64), so these messages list other dtypes
OWN_DTYPES = {"q-int"}


@pytest.mark.parametrize("name,kwargs", [pytest.param(name, kwargs, id=f"{name}-{case}")
                                         for name, case, kwargs, _ in CASES if case not in OWN_DTYPES])
def test_triton_op_refuses_as_the_cpu_op(backend, device, name, kwargs):
    """One check behind both ops: on the same CPU tensors, the Triton op's refusal is the CPU op's, word for word after
    the tag."""
    if (backend, device) != ("triton", "cpu"):
        pytest.skip("compares the Triton op on CPU tensors (the interpreter) with the CPU op")
    args = bwd_kwargs("cpu", "cpu", **kwargs) if name == "bwd" else kwargs
    cpu, triton = refusal(op("cpu", name), args), refusal(op("triton", name), args)
    assert cpu.removeprefix(tag("cpu")) == triton.removeprefix(tag("triton")), (cpu, triton)
