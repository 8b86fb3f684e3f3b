"""Block-sparse masks in the fused CPU kernel, at the op level (torch.ops.pyattn.fwd / bwd with block_states,
block_bits, block_q, block_k; csrc/ops.cpp). Random block states (empty, full, partial at densities from 10% to 90%,
broadcast over batch and heads or not) and random bits, block sizes that do and do not divide L and S or the kernel's
tiles, on the prefill and decode paths, with GQA, windows, dense masks, softcap, ALiBi and sinks: out, lse, dq, dk, dv
match the same op given the equivalent dense bool mask, and the float64 reference (the tolerance rule of
tests/helpers), on every CPU capability this machine runs. Empty blocks are never computed (NaN keys there stay out),
explain() counts the blocks visited, and the host checks name the argument."""
import functools
import re
from dataclasses import dataclass

import pytest
import torch

from helpers import assert_close_to_oracle, backend_params, dtype_id
from helpers.block_masks import dense_block_mask, random_block_mask
from pyattn import _C, reference
from pyattn.inputs import AttnInputs
from pyattn.op_args import BwdArgs, FwdArgs, pick

cpu_all = pytest.mark.parametrize("backend,device", backend_params(["cpu"]))
cpu_in_use = pytest.mark.parametrize("backend,device", backend_params(["cpu"], lower_capabilities=False))
DTYPES = [pytest.param(d, id=dtype_id(d)) for d in (torch.float32, torch.bfloat16, torch.float64)]
FP16 = pytest.param(torch.float16, id="fp16")  # decode's packed path (fp16 tiles widen to fp32)


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    block: tuple  # (block_q, block_k)
    density: float
    broadcast: tuple = (False, False)  # block_states of batch 1, of head 1
    window: tuple = (-1, -1)
    E: int = 32
    extras: tuple = ()  # (name, value) of: mask ("bool" | "float"), softcap, alibi, sinks, bottom_right


CASES = [
    Case("prefill-16x16", 1, 2, 2, 200, 230, (16, 16), 0.5),
    Case("prefill-64x128-gqa-bcast-B", 2, 4, 2, 300, 333, (64, 128), 0.1, (True, False)),
    Case("prefill-128x128-bcast-BH", 1, 2, 1, 390, 400, (128, 128), 0.9, (True, True)),
    Case("prefill-37x50-causal", 1, 2, 2, 260, 301, (37, 50), 0.5, window=(-1, 0)),
    Case("prefill-64x128-window-floatmask", 1, 2, 2, 300, 333, (64, 128), 0.9, window=(100, 20),
         extras=(("mask", "float"),)),
    Case("prefill-16x64-boolmask-softcap-alibi-sinks", 2, 2, 1, 150, 180, (16, 64), 0.5, (False, True),
         extras=(("mask", "bool"), ("softcap", 3.0), ("alibi", True), ("sinks", True))),
    Case("prefill-130x130-bottom-right-causal", 1, 1, 1, 280, 300, (130, 130), 0.9, window=(-1, 0),
         extras=(("bottom_right", True),)),
    Case("tiny-1x3", 1, 2, 1, 70, 50, (1, 3), 0.5),
    Case("decode-gqa-merged", 2, 4, 1, 7, 1100, (16, 64), 0.5),
    Case("decode-rows-10pct", 1, 4, 2, 1, 900, (1, 16), 0.1),
    Case("decode-37x50-causal-floatmask", 1, 2, 2, 40, 700, (37, 50), 0.9, window=(-1, 0),
         extras=(("mask", "float"), ("bottom_right", True))),
]
GRID = [pytest.param(c, d.values[0], id=f"{c.id}-{d.id}")
        for c in CASES for d in DTYPES + [FP16] * c.id.startswith("decode")]


@functools.lru_cache(maxsize=None)
def make_args(case, dtype):
    """-> (fwd's arguments with the block mask, the same with it as a dense mask instead, the dense mask alone); made
    once per case and dtype (the ops only read them)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, S, E = case.B, case.Hq, case.Hkv, case.L, case.S, case.E
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
               for shape in ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, E)))
    bq, bk = case.block
    states, bits = random_block_mask(1 if case.broadcast[0] else B, 1 if case.broadcast[1] else Hq, L, S, bq, bk,
                                     case.density, g)
    if case.broadcast[0]:
        states = states.expand(B, -1, -1, -1)  # stride 0, as the Python side passes a broadcast BlockMask
    x = dict(case.extras)
    mask = None
    if x.get("mask") == "bool":
        mask = torch.rand(B, Hq, L, S, generator=g) > 0.2
    elif x.get("mask") == "float":
        mask = torch.randn(B, Hq, L, S, generator=g, dtype=torch.float64).to(
            torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    args = FwdArgs(q=q, k=k, v=v, mask=mask, alibi_slopes=torch.rand(B, Hq, generator=g) if x.get("alibi") else None,
                   cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=L, max_seqlen_k=S, scale=E ** -0.5,
                   window_left=case.window[0], window_right=case.window[1], bottom_right=x.get("bottom_right", False),
                   softcap=x.get("softcap", 0.0), dropout_p=0.0, rng_state=None,
                   sinks=torch.randn(Hq, generator=g) if x.get("sinks") else None, block_states=states,
                   block_bits=bits, block_q=bq, block_k=bk)
    blocks = dense_block_mask(states, bits, bq, bk, B, Hq, L, S)
    if mask is None:
        dense = blocks
    elif mask.dtype == torch.bool:
        dense = mask & blocks
    else:
        dense = mask.masked_fill(~blocks, float("-inf"))
    return args, args._replace(mask=dense, block_states=None, block_bits=None, block_q=0, block_k=0), dense


def reference_fwd_bwd(args, dense, dtype, dout, dlse):
    """The reference math in dtype (bf16 in float32, as torch's math backend) -> out, lse, dq, dk, dv."""
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    q, k, v = (getattr(args, n).to(compute).requires_grad_() for n in ("q", "k", "v"))
    mask = dense if dense.dtype == torch.bool else dense.to(compute)
    fields = {n: getattr(args, n) for n in FwdArgs._fields if n in AttnInputs.__dataclass_fields__}
    inp = AttnInputs(**{**fields, "q": q, "k": k, "v": v, "mask": mask, "block_states": None, "block_bits": None,
                        "sinks": None if args.sinks is None else args.sinks.to(compute),
                        "return_lse": True, "out_shape": None})
    out, lse = reference.attention(inp)
    out = out.to(dtype)
    grads = torch.autograd.grad([out, lse], [q, k, v], [dout, dlse])
    return (out.detach(), lse.detach(), *(g.to(dtype) for g in grads))


def op_fwd_bwd(args, dout, dlse):
    out, lse = torch.ops.pyattn.fwd(*args)
    dq, dk, dv, _ = torch.ops.pyattn.bwd(*pick(BwdArgs, args, dout=dout, out=out, lse=lse, dlse=dlse, mask_grad=False))
    return out, lse, dq, dk, dv


NAMES = ("out", "lse", "dq", "dk", "dv")


@cpu_all
@pytest.mark.parametrize("case,dtype", GRID)
def test_block_mask_matches_dense_mask_and_oracle(backend, device, case, dtype):
    check_against_dense_and_oracle(case, dtype)


@cpu_in_use
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("tile", ["16x32", "128x256"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in (CASES[1], CASES[3], CASES[7])])
def test_block_mask_on_other_prefill_tiles(backend, device, case, dtype, tile, monkeypatch):
    """Blocks larger than the kernel's tile, and tiles that cut blocks (PYATTN_CPU_FWD_TILE, read per call)."""
    monkeypatch.setenv("PYATTN_CPU_FWD_TILE", tile)
    assert f"tiles of {tile.replace('x', ' x ')}" in _C._cpu_fwd_plan(*make_args(case, dtype)[0])
    check_against_dense_and_oracle(case, dtype)


def cotangents(case, dtype):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(case.B, case.Hq, case.L, case.E, generator=g).to(dtype),
            torch.randn(case.B, case.Hq, case.L, generator=g))


@functools.lru_cache(maxsize=None)
def references(case, dtype):
    """The float64 oracle and the reference math in dtype of a case: the same for every CPU capability."""
    args, _, dense = make_args(case, dtype)
    dout, dlse = cotangents(case, dtype)
    oracle_args = args._replace(**{n: getattr(args, n).double() for n in ("q", "k", "v")})
    return (reference_fwd_bwd(oracle_args, dense, torch.float64, dout.double(), dlse.double()),
            reference_fwd_bwd(args, dense, dtype, dout, dlse))


def check_against_dense_and_oracle(case, dtype):
    args, dense_args, dense = make_args(case, dtype)
    dout, dlse = cotangents(case, dtype)
    ours = op_fwd_bwd(args, dout, dlse)
    as_dense = op_fwd_bwd(dense_args, dout, dlse)
    # rows with no allowed key: out 0, lse -inf (the oracle's), and no gradient into them
    oracle, baseline = references(case, dtype)
    for name, y, d, b, o in zip(NAMES, ours, as_dense, baseline, oracle):
        assert_close_to_oracle(name, y, b, o, dtype)
        # the dense-mask op takes the same path with the bits spelt out: as close to it as to the oracle
        assert_close_to_oracle(f"{name} vs the dense-mask op", y, b, d, dtype, factor=3.0)


@cpu_all
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("L", [300, 4], ids=["prefill", "decode"])
def test_empty_blocks_are_never_computed(backend, device, dtype, L):
    """q (1, 2, L, 32) over 512 keys in blocks of 64: key blocks 2 and 3 empty for every query, NaN in k and v
    there."""
    args, _, _ = make_args(Case("nan-in-empty", 1, 2, 2, L, 512, (64, 64), 0.9), dtype)
    states = args.block_states.clone()
    states[..., 2:4] = 0
    k, v = args.k.clone(), args.v.clone()
    k[:, :, 128:256] = float("nan")
    v[:, :, 128:256] = float("nan")
    out, lse = torch.ops.pyattn.fwd(*args._replace(block_states=states, k=k, v=v))
    assert not out.isnan().any() and not lse.isnan().any()
    clean, clean_lse = torch.ops.pyattn.fwd(*args._replace(block_states=states))
    torch.testing.assert_close(out, clean, atol=0, rtol=0)
    torch.testing.assert_close(lse, clean_lse, atol=0, rtol=0)


@cpu_all
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in (CASES[1], CASES[8])])
def test_explain_counts_the_visited_blocks(backend, device, case):
    args, _, _ = make_args(case, torch.float32)
    states = args.block_states.expand(case.B, case.Hq, -1, -1)
    visited, full = int((states != 0).sum()), int((states == 1).sum())
    plan = _C._cpu_fwd_plan(*args)
    bq, bk = case.block
    assert (f"block mask of {bq} x {bk} blocks: {visited} of {states.numel()} visited ({full} full, "
            f"{visited - full} partial)") in plan, plan
    assert plan.startswith("decode:" if case.L < 10 else "prefill:"), plan
    _C._cpu_last_fwd_run()
    torch.ops.pyattn.fwd(*args)
    assert _C._cpu_last_fwd_run() == plan


def test_no_block_mask_leaves_the_plan_unchanged():
    args, _, _ = make_args(CASES[0], torch.float32)
    assert "block mask" not in _C._cpu_fwd_plan(*args._replace(block_states=None, block_bits=None))


# ----------------------------------------------------------------------------------------------------------
# host checks: q (2, 4, 10, 8), k/v (2, 2, 20, 8), blocks of 4 x 8 -> block_states (1|2, 1|4, 3, 3)

def i32(*shape, value=1):
    return torch.full(shape, value, dtype=torch.int32)


BITS = torch.zeros(2, 4, 1, dtype=torch.uint8)
BAD = [
    ("states-int64", dict(block_states=i32(2, 4, 3, 3).long()), ["block_states must be int32", "Long", "[2, 4, 3, 3]"]),
    ("states-3d", dict(block_states=i32(4, 3, 3)), ["block_states must be int32 (1 or B, 1 or Hq, ceil(L / block_q), "
                                                    "ceil(S / block_k)) = (1 or 2, 1 or 4, 3, 3)", "[4, 3, 3]"]),
    ("states-query-blocks", dict(block_states=i32(2, 4, 2, 3)), ["= (1 or 2, 1 or 4, 3, 3)", "[2, 4, 2, 3]"]),
    ("states-batch-3", dict(block_states=i32(3, 4, 3, 3)), ["block_states must be int32", "[3, 4, 3, 3]"]),
    ("states-heads-2", dict(block_states=i32(2, 2, 3, 3)), ["block_states must be int32", "[2, 2, 3, 3]"]),
    ("block-q-zero", dict(block_q=0), ["block_q and block_k must be >= 1", "got 0 and 8"]),
    ("bits-int32", dict(block_bits=BITS.int()), ["block_bits must be a contiguous uint8 (P, block_q, "
                                                 "ceil(block_k / 8)) = (P, 4, 1)", "Int"]),
    ("bits-rows", dict(block_bits=torch.zeros(2, 8, 1, dtype=torch.uint8)), ["block_bits must be", "[2, 8, 1]"]),
    ("bits-strided", dict(block_bits=torch.zeros(2, 4, 2, dtype=torch.uint8)[:, :, :1]),
     ["block_bits must be", "(not contiguous)"]),
    ("bits-without-states", dict(block_states=None), ["block_bits [2, 4, 1] needs block_states"]),
    ("state-past-bits", dict(block_states=i32(1, 1, 3, 3).index_put_((torch.tensor(0),) * 3 + (torch.tensor(2),),
                                                                      torch.tensor(4, dtype=torch.int32))),
     ["block_states[0, 0, 0, 2] = 4 is outside [0, 4)", "2 in block_bits"]),
    ("state-negative", dict(block_states=i32(1, 4, 3, 3, value=-1)), ["block_states[0, 0, 0, 0] = -1"]),
    ("partial-without-bits", dict(block_states=i32(1, 1, 3, 3, value=2), block_bits=None),
     ["block_states[0, 0, 0, 0] = 2 is outside [0, 2)"]),
    ("varlen", dict(q=torch.randn(1, 4, 10, 8), k=torch.randn(1, 2, 20, 8), v=torch.randn(1, 2, 20, 8),
                    block_states=i32(1, 4, 3, 3), cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32),
                    cu_seqlens_k=torch.tensor([0, 20], dtype=torch.int32)),
     ["block_states is not supported with cu_seqlens (varlen)"]),
]


def base_args(**kw):
    return FwdArgs(q=torch.randn(2, 4, 10, 8), k=torch.randn(2, 2, 20, 8), v=torch.randn(2, 2, 20, 8), mask=None,
                   alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=10, max_seqlen_k=20,
                   scale=0.3, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0, dropout_p=0.0,
                   rng_state=None, sinks=None, block_states=i32(2, 4, 3, 3), block_bits=BITS, block_q=4,
                   block_k=8)._replace(**kw)


def test_valid_block_mask_arguments_run():
    out, lse = torch.ops.pyattn.fwd(*base_args())
    assert out.shape == (2, 4, 10, 8)


@pytest.mark.parametrize("check", ["fwd", "bwd", "check_fwd"])
@pytest.mark.parametrize("bad,words", [pytest.param(b, w, id=i) for i, b, w in BAD])
def test_host_checks_name_the_argument(check, bad, words):
    args = base_args(**bad)
    if check == "fwd":
        call, tag = lambda: torch.ops.pyattn.fwd(*args), "pyattn cpu: "
    elif check == "bwd":
        out, lse = torch.ops.pyattn.fwd(*base_args())
        bwd = pick(BwdArgs, args, dout=out, out=out, lse=lse, dlse=None, mask_grad=False)
        call, tag = lambda: torch.ops.pyattn.bwd(*bwd), "pyattn cpu: "
    else:  # what the Triton ops run before launching
        call, tag = lambda: _C.check_fwd("pyattn triton", [torch.float32], *args), "pyattn triton: "
    with pytest.raises(RuntimeError) as info:
        call()
    message = str(info.value).splitlines()[0]
    assert message.startswith(tag), message
    for w in words:
        assert w in message, (w, message)
    assert re.search(r"block_(states|bits|q)", message)


@cpu_in_use
def test_opcheck_with_block_mask(backend, device):
    """Schema, fake impls and autograd with a block mask: the autograd wrapper hands bwd block_q and block_k too."""
    args, dense_args, _ = make_args(CASES[7], torch.float32)
    leaves = {n: getattr(args, n).detach().clone().requires_grad_() for n in ("q", "k", "v")}
    torch.library.opcheck(torch.ops.pyattn.fwd.default, args._replace(**leaves))
    out, lse = torch.ops.pyattn.fwd(*args._replace(**leaves))
    grads = torch.autograd.grad((out * out).sum() + lse.masked_fill(lse.isinf(), 0).sum(), list(leaves.values()))
    d_leaves = {n: getattr(dense_args, n).detach().clone().requires_grad_() for n in ("q", "k", "v")}
    d_out, d_lse = torch.ops.pyattn.fwd(*dense_args._replace(**d_leaves))
    want = torch.autograd.grad((d_out * d_out).sum() + d_lse.masked_fill(d_lse.isinf(), 0).sum(),
                               list(d_leaves.values()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    bwd = pick(BwdArgs, args, dout=torch.randn_like(out), out=out.detach(), lse=lse.detach(), dlse=None,
               mask_grad=False)
    torch.library.opcheck(torch.ops.pyattn.bwd.default, bwd)
