"""Tile choice: block sizes, warps and stages per head dim, sequence bucket, causal and architecture.

Small problems (and every test shape) get one fixed config, so they compile once and never autotune; long
sequences autotune over a pruned list: the fixed tiles plus a neighbourhood around them, the fixed one
always kept. Re-measure with `python -m benchmarks --device cuda` before changing them.
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
    return cc >= 100 and _triton_warp_specializes()


@functools.cache
def _triton_warp_specializes():
    import inspect

    import triton.language as tl
    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (arch, padded head dim), chosen with `python -m pyattn.inspect`
# near FlashAttention-2's tile shapes: no spills, loads pipelined (cp.async; TMA + wgmma in the sm_90
# forward), at least 2 stages. Untimed: no GPU has run them yet.
FWD_TILES = {(80, 64): (128, 64, 8, 3), (80, 128): (128, 32, 8, 3), (80, 256): (64, 32, 8, 2),
             (90, 64): (128, 128, 8, 3), (90, 128): (128, 128, 8, 2), (90, 256): (64, 64, 8, 2)}
DKDV_TILES = {(80, 64): (64, 32, 8, 2), (80, 128): (16, 64, 8, 2), (80, 256): (16, 32, 8, 2),
              (90, 64): (32, 128, 8, 2), (90, 128): (16, 128, 8, 2), (90, 256): (16, 32, 8, 2)}
DQ_TILES = {(80, 64): (128, 32, 8, 2), (80, 128): (64, 32, 4, 3), (80, 256): (32, 32, 4, 2),
            (90, 64): (128, 64, 8, 2), (90, 128): (128, 64, 8, 2), (90, 256): (32, 64, 8, 2)}
# the paged KV-cache forward where its per-key page and row offsets need a smaller tile: sm_90 d128 spilled 8 bytes
# at 128x128 (255 registers, pyattn.inspect); 128x64 with 3 stages fits in 224. Elsewhere FWD_TILES fit.
FWD_PAGED_TILES = {(90, 128): (128, 64, 8, 3)}
# the block-sparse forward (a partial block's bits in registers) where FWD_TILES spill: sm_90 d128 at 128x128 spilled
# 24 bytes (255 registers, pyattn.inspect); 128x64 with 3 stages fits in 211. Its tiles still shrink to divide the
# mask blocks (block_mask.fitted_tiles).
FWD_BLOCK_MASK_TILES = {(90, 128): (128, 64, 8, 3)}
INTERPRETER_TILES = (16, 32, 1, 1)  # several blocks even for the tests' small shapes

# Head dims above 256 (Gemma's 512, MLA's 576 / 512): q, K and the accumulators no longer fit in registers whole, and
# padding 576 to a power of two would double it. The kernels take them in chunks instead (CHUNKED constexpr branches;
# the <= 256 paths and tiles above are untouched), as FlashAttention-3 does for its large head dims:
# - every q.k and dO.v is accumulated over the contraction dim in K_CHUNK-wide slices loaded in a loop, so no
#   (rows, E) operand is ever held: registers and shared memory are those of a d64 tile whatever E is;
# - each program owns OUT_CHUNK columns of one output (out, dK, dV or dQ) and a grid dimension walks the chunks, so
#   the accumulator is (BLOCK, OUT_CHUNK) fp32: at 256 the same 64 registers a thread holds in the d256 kernels.
#   The price is that each output chunk recomputes the scores: 2 x for Ev = 512 in the forward; a wider chunk
#   would spill (a 64 x 512 fp32 accumulator is 128 registers per thread at 8 warps, before the score tile).
# E != Ev needs nothing more: the two dims are chunked apart.
CHUNKED_FROM = 257  # max(E, Ev) from which the kernels chunk the head dims
K_CHUNK = 64
OUT_CHUNK = 256
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the chunked kernels by arch; chosen with `python -m pyattn.inspect`
CHUNKED_FWD_TILES = {80: (64, 32, 8, 2), 90: (64, 64, 8, 2)}
CHUNKED_DKDV_TILES = {80: (32, 64, 8, 2), 90: (32, 64, 8, 2)}
CHUNKED_DQ_TILES = {80: (64, 32, 8, 2), 90: (64, 32, 8, 2)}
INTERPRETER_CHUNKS = (64, 128)  # K_CHUNK, OUT_CHUNK under the interpreter: several chunks even at small dims


def chunked(head_dim, head_dim_v):
    return max(head_dim, head_dim_v) >= CHUNKED_FROM


def chunks():
    """-> (K_CHUNK, OUT_CHUNK) of the chunked kernels."""
    return INTERPRETER_CHUNKS if INTERPRET else (K_CHUNK, OUT_CHUNK)


def chunked_tiles(table, cc):
    return INTERPRETER_TILES if INTERPRET else table[90 if cc >= 90 else 80]


def _key(head_dim, cc):
    return 90 if cc >= 90 else 80, 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def _pick(table, head_dim, cc):
    if INTERPRET:
        return INTERPRETER_TILES
    return table[_key(head_dim, cc)]


def fwd_default(head_dim, cc, paged=False, block_mask=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward without autotuning (paged: K/V through pages;
    block_mask: with a block-sparse mask)."""
    tiles = _pick(FWD_TILES, head_dim, cc)
    if INTERPRET:
        return tiles
    if paged:
        return FWD_PAGED_TILES.get(_key(head_dim, cc), tiles)
    return FWD_BLOCK_MASK_TILES.get(_key(head_dim, cc), tiles) if block_mask else tiles


def decode_tiles(rows, head_dim):
    """Split-KV forward for few packed rows: (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if INTERPRET:
        return INTERPRETER_TILES
    return max(16, min(64, triton.next_power_of_2(rows))), (64 if head_dim > 64 else 128), 4, 3


def bwd_default(head_dim, cc):
    """Tiles of the dK/dV kernel and of the dQ kernel."""
    return _pick(DKDV_TILES, head_dim, cc), _pick(DQ_TILES, head_dim, cc)


def _candidates(tiles, neighbours, warp_specialize=False):
    """The fixed tiles of every arch and head dim plus a neighbourhood around them, as autotune configs."""
    tiles = sorted(set(tiles) | set(neighbours))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **({"WARP_SPECIALIZE": ws} if warp_specialize else {})},
                          num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in tiles for ws in ((False, True) if warp_specialize else (False,))]


def _tile(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def fwd_autotune_configs():
    neighbours = [(bm, bn, w, st) for bm, bn in ((64, 64), (128, 64), (128, 128)) for w in (4, 8) for st in (2, 3)]
    return _candidates(FWD_TILES.values(), neighbours, warp_specialize=True)


def bwd_autotune_configs():
    neighbours = [(bm, bn, w, 2) for bm, bn in ((32, 64), (32, 128), (64, 64), (64, 32), (128, 64)) for w in (4, 8)]
    return _candidates([*DKDV_TILES.values(), *DQ_TILES.values()], neighbours)


def prune_fwd(configs, named_args, cc, **kwargs):
    """Drop tiles that cannot fit or cannot help on architecture cc: shared memory by head dim, warp
    specialization where Triton's does not help. The fixed (spill-free) tile always stays."""
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    default = fwd_default(d, cc)
    kept = []
    for c in configs:
        bm, bn, ws = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["WARP_SPECIALIZE"]
        if ws and not has_warp_specialize(cc):
            continue
        smem = 2 * (bm * d + c.num_stages * bn * 2 * d)
        fits = smem <= (227 if cc >= 90 else 163) * 1024 and not (d >= 256 and (bm > 64 or bn > 64)) \
            and not (bm == 128 and c.num_warps == 4 and d >= 128)
        if fits or _tile(c) == default:
            kept.append(c)
    return kept


def prune_bwd(configs, named_args, cc, kernel, **kwargs):
    """As prune_fwd, for the dK/dV or dQ kernel (kernel: its fixed-tile table)."""
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    default = _pick(kernel, d, cc)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # K, V, dK, dV tiles stay resident; Q, dO (and their stages) stream
        smem = 2 * (2 * bn * d + c.num_stages * 2 * bm * d) + 4 * bm * bn
        fits = smem <= (227 if cc >= 90 else 163) * 1024 and not (d >= 256 and bm * bn > 32 * 64)
        if fits or _tile(c) == default:
            kept.append(c)
    return kept
