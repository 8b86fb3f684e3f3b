"""Block-sparse masks (block_states / block_bits) in the Triton kernels: out, lse, dq, dk, dv of pyattn::triton_fwd /
triton_bwd against float64 math with the equivalent dense mask (states and bits expanded to (B, Hq, L, S)), with the
tolerance rule (plain math in the same dtype). Runs on CUDA, or on CPU tensors under the interpreter: few, small cases,
each chosen for a path: tiles fitted to the blocks (TILES) with L, S not multiples of them, GQA heads padded apart,
broadcast states, a band, a dense float mask beside the block mask, empty rows, and block sizes no tile fits
(GATHER)."""
import math
from dataclasses import dataclass

import pytest
import torch

from helpers import assert_close_to_oracle, backend_params, block_masks, dtype_id
from pyattn.kernels import block_mask, configs
from pyattn.op_args import BwdArgs, FwdArgs, pick

pytestmark = pytest.mark.parametrize("backend,device", backend_params(["triton"]))


@dataclass(frozen=True)
class BlockCase:
    id: str
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int
    block_q: int
    block_k: int
    density: float  # fraction of non-empty blocks; half of those partial
    window: tuple = (-1, -1)
    float_mask: bool = False
    states_batch_heads: tuple = None  # (Bm, Hm) of block_states; None: (B, Hq)
    broadcast_view: bool = False  # states expanded to (B, Hq, ...) with stride 0


CASES = [
    BlockCase("b16x16-dense50-L50-S70", 2, 2, 2, 50, 70, 16, 16, 16, 0.5, states_batch_heads=(1, 2)),
    BlockCase("b32x64-dense90-gqa-causal", 1, 4, 2, 40, 100, 32, 32, 64, 0.9, window=(-1, 0)),
    BlockCase("b16x32-dense10-gqa-window", 1, 2, 1, 61, 120, 32, 16, 32, 0.1, window=(24, 8)),
    BlockCase("b16x16-dense50-floatmask-broadcast", 2, 2, 2, 45, 64, 16, 16, 16, 0.5, float_mask=True,
              broadcast_view=True),
    BlockCase("b37x20-gather", 1, 2, 2, 50, 70, 16, 37, 20, 0.5),
]
CASE_DTYPES = [(CASES[0], torch.float32), (CASES[1], torch.float16), (CASES[2], torch.float32),
               (CASES[3], torch.float16), (CASES[4], torch.float32)]


def random_block_mask(c, gen):
    """-> states (Bm, Hm, Qb, Kb) int32, bits (P, block_q, ceil(block_k / 8)) uint8."""
    Bm, Hm = c.states_batch_heads or (c.B, c.Hq)
    states, bits = block_masks.random_block_mask(Bm, Hm, c.L, c.S, c.block_q, c.block_k, c.density, gen)
    if c.broadcast_view:
        states = states[:1, :1].expand(c.B, c.Hq, *states.shape[2:])
    return states, bits


def dense_keep(states, bits, c):
    """The block mask as a dense bool (B, Hq, L, S): True = may attend."""
    return block_masks.dense_block_mask(states, bits, c.block_q, c.block_k, c.B, c.Hq, c.L, c.S)


def band_keep(c):
    i, n = torch.arange(c.L)[:, None], torch.arange(c.S)[None, :]
    left, right = c.window
    return ((n >= i - left) | (left < 0)) & ((n <= i + right) | (right < 0))


def masked_attention(q, k, v, keep, bias, scale):
    """Plain math: softmax(scale q k^T + bias, masked by keep) v -> out, lse; rows with no key: 0 and -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), -1, keepdim=True)  # no -inf - -inf in the empty rows' grads
    p = torch.exp(s - lse)
    return p @ v, lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("-inf")).float()


def run_math(t, keep, scale, dtype, dout):
    """-> (out, lse, dq, dk, dv, dmask) of masked_attention in dtype."""
    leaves = {n: x.detach().to(dtype).requires_grad_() for n, x in t.items() if x is not None}
    out, lse = masked_attention(leaves["q"], leaves["k"], leaves["v"], keep, leaves.get("mask"), scale)
    out.backward(dout.to(dtype))
    grads = [leaves[n].grad for n in ("q", "k", "v")] + [leaves["mask"].grad if "mask" in leaves else None]
    return [out.detach(), lse.detach(), *grads]


def triton_args(t, c, states, bits, scale, dtype, device):
    """FwdArgs of pyattn::triton_fwd for tensors t in dtype on device, with the block mask."""
    on = {n: None if x is None else x.to(device, dtype) for n, x in t.items()}
    return FwdArgs(q=on["q"], k=on["k"], v=on["v"], mask=on["mask"], alibi_slopes=None, cu_seqlens_q=None,
                   cu_seqlens_k=None, max_seqlen_q=c.L, max_seqlen_k=c.S, scale=scale, window_left=c.window[0],
                   window_right=c.window[1], bottom_right=False, softcap=0.0, dropout_p=0.0, rng_state=None,
                   sinks=None, block_states=states.to(device), block_bits=bits.to(device), block_q=c.block_q,
                   block_k=c.block_k)


def run_triton(t, c, states, bits, scale, dtype, dout, device):
    """-> (out, lse, dq, dk, dv, dmask) of pyattn::triton_fwd / triton_bwd with the block mask."""
    fwd = triton_args(t, c, states, bits, scale, dtype, device)
    out, lse = torch.ops.pyattn.triton_fwd(*fwd)
    bwd = pick(BwdArgs, fwd, dout=dout.to(device, dtype), out=out, lse=lse, dlse=None, mask_grad=c.float_mask)
    dq, dk, dv, dmask = torch.ops.pyattn.triton_bwd(*bwd)
    return [x.cpu() for x in (out, lse, dq, dk, dv)] + [dmask.cpu() if c.float_mask else None]


def check_against_dense_math(c, dtype, device):
    gen = torch.Generator().manual_seed(0)
    t = dict(q=torch.randn(c.B, c.Hq, c.L, c.D, generator=gen), k=torch.randn(c.B, c.Hkv, c.S, c.D, generator=gen),
             v=torch.randn(c.B, c.Hkv, c.S, c.D, generator=gen),
             mask=torch.randn(c.B, c.Hq, c.L, c.S, generator=gen) if c.float_mask else None)
    states, bits = random_block_mask(c, gen)
    keep = dense_keep(states, bits, c) & band_keep(c)
    assert (~keep.any(-1)).any() or c.density > 0.2, "the sparse cases must have rows with no key"
    scale = 1 / math.sqrt(c.D)
    dout = torch.randn(c.B, c.Hq, c.L, c.D, generator=gen)
    oracle = run_math(t, keep, scale, torch.float64, dout)
    base = run_math(t, keep, scale, dtype, dout)
    ours = run_triton(t, c, states, bits, scale, dtype, dout, device)
    for name, y, b, o in zip(("out", "lse", "dq", "dk", "dv", "dmask"), ours, base, oracle):
        if o is not None:
            assert_close_to_oracle(name, y, b, o, dtype)


@pytest.mark.parametrize("case,dtype", CASE_DTYPES, ids=[f"{c.id}-{dtype_id(d)}" for c, d in CASE_DTYPES])
def test_block_mask_matches_dense_math(backend, device, case, dtype):
    check_against_dense_math(case, dtype, device)


def test_block_mask_tma_path(backend, device, monkeypatch):
    """K/V through tensor descriptors (sm_90; forced under the interpreter) at the list's key blocks."""
    if device == "cpu":
        monkeypatch.setattr(configs, "TMA_IN_INTERPRETER", True)
    check_against_dense_math(CASES[1], torch.float16, device)


def test_opcheck(backend, device):
    """The ops with block-mask arguments: schema, fake impls and autograd registration agree with the kernels."""
    c = BlockCase("opcheck", 1, 2, 1, 20, 40, 16, 16, 16, 0.6)
    gen = torch.Generator().manual_seed(0)
    t = dict(q=torch.randn(1, 2, 20, 16, generator=gen), k=torch.randn(1, 1, 40, 16, generator=gen),
             v=torch.randn(1, 1, 40, 16, generator=gen), mask=None)
    states, bits = random_block_mask(c, gen)
    fwd = triton_args(t, c, states, bits, 0.25, torch.float32, device)
    torch.library.opcheck(torch.ops.pyattn.triton_fwd.default, fwd)
    out, lse = torch.ops.pyattn.triton_fwd(*fwd)
    bwd = pick(BwdArgs, fwd, dout=torch.randn_like(out), out=out, lse=lse, dlse=None, mask_grad=False)
    torch.library.opcheck(torch.ops.pyattn.triton_bwd.default, bwd)


def test_tiles_fit_the_blocks(backend, device):
    """Config tiles are cut to divide the mask blocks; blocks no 16-wide tile divides fall back to GATHER."""
    assert block_mask.fitted_tiles(128, 64, 128, 128) == (block_mask.BLOCK_MASK_TILES.value, 128, 64)
    assert block_mask.fitted_tiles(128, 64, 32, 48) == (block_mask.BLOCK_MASK_TILES.value, 32, 16)
    for blocks in ((37, 128), (128, 8), (1, 1)):
        assert block_mask.fitted_tiles(128, 64, *blocks) == (block_mask.BLOCK_MASK_GATHER.value, 128, 64), blocks


def test_visit_lists(backend, device):
    """Each row's count of non-empty blocks, then their columns ascending."""
    states = torch.randint(0, 4, (2, 3, 5, 7), dtype=torch.int32) * (torch.rand(2, 3, 5, 7) < 0.4)
    lists = block_mask.visit_lists(states.to(device)).cpu()
    for row, got in zip(states.reshape(-1, 7), lists.reshape(-1, 8)):
        want = row.nonzero().flatten().to(torch.int32)
        assert got[0] == len(want) and torch.equal(got[1:1 + len(want)], want), (row, got)
