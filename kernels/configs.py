"""Tile choice: block sizes, warps and stages per head dim, sequence bucket, causal and architecture.

Small problems (and every test shape) get one fixed config, so they compile once and never autotune; long
sequences autotune over a pruned list. The starting points are FlashAttention-2's and the Triton fused
attention tutorial's tiles for A100/H100 (d64: 128x64, d128: 128x64/128x128, d256: 64x32); the lists span
one step around them. Re-measure with `python -m benchmarks --device cuda` before changing them.
"""
import functools
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TMA_IN_INTERPRETER = False  # tests flip it to run the tensor-descriptor path under the interpreter
AUTOTUNE_IN_INTERPRETER = False  # ... and this to run the autotuned launches (with a stand-in timer)
AUTOTUNE_FROM = 2048  # max(L, S) from which the forward and backward autotune


def padded(head_dim):
    """Head dim rounded up to a power of two >= 16 (tl.dot's minimum); loads mask the padding."""
    return max(16, triton.next_power_of_2(head_dim))


def autotunes(seqlen):
    return (not INTERPRET or AUTOTUNE_IN_INTERPRETER) and seqlen >= AUTOTUNE_FROM


def seq_bucket(n):
    """Autotune key: 2k, 4k, 8k, >=16k."""
    return min(max(triton.next_power_of_2(n), AUTOTUNE_FROM), 16384)


@functools.cache
def arch(device_index=0):
    """Compute capability as an int (80, 90, ...); 0 when interpreting."""
    if INTERPRET:
        return 0
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


@functools.cache
def num_sms(device_index=0):
    return 4 if INTERPRET else torch.cuda.get_device_properties(device_index).multi_processor_count


def has_tensor_descriptors():
    import triton.language as tl
    return hasattr(tl, "make_tensor_descriptor")


def has_warp_specialize(cc):
    """Triton's automatic warp specialization, where it helps. Offered on Hopper since Triton 3.4, but the
    sm_90 AOT checks with 3.7 found it failing to compile for d64 and changing nothing for d128 (same
    registers, shared memory and SASS), so it is used on Blackwell only, as Triton's own tutorial does."""
    import inspect

    import triton.language as tl
    return cc >= 100 and "warp_specialize" in inspect.signature(tl.range.__init__).parameters


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (arch, padded head dim), chosen with `python -m pyattn.inspect`
# near FlashAttention-2's tile shapes: no spills, loads pipelined (cp.async; TMA + wgmma in the sm_90
# forward), at least 2 stages. Untimed: no GPU has run them yet.
FWD_TILES = {(80, 64): (128, 64, 8, 3), (80, 128): (128, 32, 8, 3), (80, 256): (64, 32, 8, 2),
             (90, 64): (128, 128, 8, 3), (90, 128): (128, 128, 8, 2), (90, 256): (64, 64, 8, 2)}
DKDV_TILES = {(80, 64): (64, 32, 8, 2), (80, 128): (16, 64, 8, 2), (80, 256): (16, 32, 8, 2),
              (90, 64): (32, 128, 8, 2), (90, 128): (16, 128, 8, 2), (90, 256): (16, 32, 8, 2)}
DQ_TILES = {(80, 64): (128, 32, 8, 2), (80, 128): (64, 32, 4, 3), (80, 256): (32, 32, 4, 2),
            (90, 64): (128, 64, 8, 2), (90, 128): (128, 64, 8, 2), (90, 256): (32, 64, 8, 2)}
INTERPRETER_TILES = (16, 32, 1, 1)  # several blocks even for the tests' small shapes


def _pick(table, head_dim, cc):
    if INTERPRET:
        return INTERPRETER_TILES
    return table[(90 if cc >= 90 else 80, 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256)]


def fwd_default(head_dim, cc):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward without autotuning."""
    return _pick(FWD_TILES, head_dim, cc)


def decode_tiles(rows, head_dim):
    """Split-KV forward for few packed rows: (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if INTERPRET:
        return INTERPRETER_TILES
    return max(16, min(64, triton.next_power_of_2(rows))), (64 if head_dim > 64 else 128), 4, 3


def bwd_default(head_dim, cc):
    """Tiles of the dK/dV kernel and of the dQ kernel."""
    return _pick(DKDV_TILES, head_dim, cc), _pick(DQ_TILES, head_dim, cc)


def fwd_autotune_configs():
    """The fixed tiles' neighbourhood: small enough that a sweep autotunes each key in seconds."""
    configs = []
    for bm, bn in ((64, 64), (128, 64), (128, 128)):
        for warps in (4, 8):
            for stages in (2, 3):
                for ws in (False, True):
                    configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws},
                                                 num_warps=warps, num_stages=stages))
    return configs


def prune_fwd(configs, named_args, cc, **kwargs):
    """Drop tiles that cannot fit or cannot help on architecture cc: shared memory by head dim, warp
    specialization where Triton's does not help."""
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    kept = []
    for c in configs:
        bm, bn, ws = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["WARP_SPECIALIZE"]
        smem = 2 * (bm * d + c.num_stages * bn * 2 * d)
        if smem > (227 if cc >= 90 else 163) * 1024 or (ws and not has_warp_specialize(cc)):
            continue
        if d >= 256 and (bm > 64 or bn > 64):
            continue
        if bm == 128 and c.num_warps == 4 and d >= 128:
            continue
        kept.append(c)
    return kept or configs[:1]


def bwd_autotune_configs():
    configs = []
    for bm, bn in ((32, 64), (32, 128), (64, 64), (64, 32), (128, 64)):
        for warps in (4, 8):
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=2))
    return configs


def prune_bwd(configs, named_args, cc, **kwargs):
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # K, V, dK, dV tiles stay resident; Q, dO (and their stages) stream
        smem = 2 * (2 * bn * d + c.num_stages * 2 * bm * d) + 4 * bm * bn
        if smem > (227 if cc >= 90 else 163) * 1024:
            continue
        if d >= 256 and bm * bn > 32 * 64:
            continue
        kept.append(c)
    return kept or configs[:1]
