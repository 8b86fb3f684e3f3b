"""Block-sparse masks (a FlexAttention BlockMask as the ops take it): the visit lists the launcher builds, the tile
rule, and the per-element test the kernels apply.

block_states (Bm, Hm, Qb, Kb) int32: 0 empty (never visited), 1 full (no per-element mask), 2 + i partial (bits of
block_bits[i], (P, block_q, ceil(block_k / 8)) uint8, bit c % 8 of byte c // 8 of row r).

Two kernel modes (BLOCK_MASK constexpr):
- TILES: BLOCK_M divides block_q and BLOCK_N divides block_k, and each query head's rows are padded to a multiple of
  BLOCK_M in the packed row order (tiles.packed_rows), so every kernel tile lies in one mask block and has one state.
  A program walks a list of the non-empty blocks of its mask row (forward, dQ) or column (dK/dV): empty blocks cost
  nothing, full ones run the unmasked path, partial ones load their bits.
- GATHER: block sizes no tile fits (block_q = 37, or below tl.dot's 16): the dense key (or query) loop, every element
  looking its block's state up. Correct, no skipping; the fallback. Its two dependent per-element loads spill at the
  default tiles (sm_90 d128: 1152 bytes in the forward, 832 in dQ, 144 in dK/dV; not among pyattn.inspect's variants).

Why lists and not a scan of the states row in the kernel: a scan costs every program Kb scalar loads and branches
whatever the density (1024 at S = 128k, block_k = 128), and its loop cannot skip an empty block without a data-
dependent branch around the whole tile body; the list costs one count and one index load per visited block, so a 10%
dense mask runs ~10% of the key loop with exact trip counts. Building the lists is two O(Qb * Kb) torch ops per call
(cumsum + scatter, no sort), small next to the attention. FlexAttention's kv_indices / kv_num_blocks are the same
idea. The kernels loop over list entries and, inside one, over its BLOCK_N tiles (block_k / BLOCK_N of them); the
band (causal, window) still cuts each entry's range, so blocks outside every row's band cost one index load. Triton
software-pipelines the inner loop only, so with block_k = BLOCK_N the next block's K/V load is not issued ahead
(FlexAttention flattens the two loops to get that); flattening here would need the band cut per flattened index.
Untimed: no GPU has run these kernels yet.
"""
import torch
import triton
import triton.language as tl

BLOCK_MASK_NONE = tl.constexpr(0)
BLOCK_MASK_TILES = tl.constexpr(1)
BLOCK_MASK_GATHER = tl.constexpr(2)
MIN_TILE = 16  # tl.dot's smallest dimension


def _low_power_of_two(n):
    return n & -n


def fitted_tiles(block_m, block_n, block_q, block_k):
    """-> (mode, BLOCK_M, BLOCK_N): the config's tiles cut down to divide the mask blocks (TILES), or unchanged
    (GATHER) when that would go below 16."""
    bm = min(block_m, _low_power_of_two(block_q))
    bn = min(block_n, _low_power_of_two(block_k))
    if bm < MIN_TILE or bn < MIN_TILE:
        return BLOCK_MASK_GATHER.value, block_m, block_n
    return BLOCK_MASK_TILES.value, bm, bn


def _unbroadcast(states):
    """Batch and head dims that are broadcast views (stride 0) become size 1: lists are built once per real row."""
    for d in (0, 1):
        if states.shape[d] > 1 and states.stride(d) == 0:
            states = states.narrow(d, 0, 1)
    return states


def visit_lists(states):
    """states (Bm, Hm, R, C) int32 -> (Bm, Hm, R, 1 + C) int32: per row the number of non-empty blocks, then their
    column indices ascending (the rest unspecified)."""
    nonempty = states != 0
    cols = states.shape[-1]
    # compaction without a sort: block c goes to slot 1 + (non-empty blocks before it); empty ones to a spare slot
    slot = torch.where(nonempty, nonempty.cumsum(-1), cols + 1)
    lists = torch.zeros(*states.shape[:-1], cols + 2, dtype=torch.int32, device=states.device)
    col_ids = torch.arange(cols, dtype=torch.int32, device=states.device).expand(states.shape).contiguous()
    lists.scatter_(-1, slot, col_ids)
    lists[..., 0] = nonempty.sum(-1, dtype=torch.int32)
    return lists[..., :cols + 1]


def _strides(prefix, t, dims):
    """Kernel stride arguments, 0 on size-1 dims (broadcast)."""
    return {f"stride_{prefix}{d}": (0 if n == 1 else s) for d, n, s in zip(dims, t.shape, t.stride())}


def kernel_args(q, states=None, bits=None, block_q=0, block_k=0, columns=False):
    """The kernels' block-mask arguments (q stands in for absent pointers). columns: the dK/dV kernel's lists (per
    key block, of query blocks)."""
    if states is None:
        return dict(States=q, Bits=q, Lists=q, stride_stb=0, stride_sth=0, stride_stq=0, stride_stk=0, stride_lib=0,
                    stride_lih=0, stride_lir=0, block_q=1, block_k=1, bits_row=1)
    states = _unbroadcast(states)
    lists = visit_lists(states.transpose(2, 3) if columns else states)
    return dict(States=states, Bits=q if bits is None else bits, Lists=lists, **_strides("st", states, "bhqk"),
                **_strides("li", lists, "bhr"), block_q=block_q, block_k=block_k, bits_row=triton.cdiv(block_k, 8))


@triton.jit
def _allowed_bit(Bits, state, r2, c2, block_q, bits_row, ok2):
    """GATHER: bit (r2, c2) of partial block state (>= 2) where ok2, False elsewhere."""
    base = (state - 2).to(tl.int64) * (block_q * bits_row)
    byte = tl.load(Bits + base + r2 * bits_row + c2 // 8, mask=ok2, other=0).to(tl.int32)
    return ((byte >> (c2 % 8)) & 1) != 0


@triton.jit
def _tile_bits(Bits, state, r0, c0, block_q, bits_row, ROWS: tl.constexpr, COLS: tl.constexpr):
    """TILES: (ROWS, COLS) bits of partial block `state` (>= 2) from its row r0 and column c0 (a multiple of 8): a
    (ROWS, COLS / 8) byte tile, every byte loaded once and spread over its 8 columns in registers (a per-element
    load would hold a 64-bit address per score element: spills at the default tiles). All in the block: no mask."""
    block = Bits + (state - 2).to(tl.int64) * (block_q * bits_row) + r0 * bits_row + c0 // 8
    byte = tl.load(block + tl.arange(0, ROWS)[:, None] * bits_row + tl.arange(0, COLS // 8)[None, :]).to(tl.int32)
    bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, COLS)) != 0


@triton.jit
def block_masked(s, Bits, state_rows2, state, i2, n2, r0, c0, ok2, seqlen_k, block_q, block_k, bits_row,
                 stride_stq, stride_stk, BLOCK_MASK: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """s with -inf where the block mask forbids query i2 key n2 (indices in the sequence; a (queries, keys) tile, or
    KEYS_FIRST (keys, queries), as in scores.py); ok2: the query exists. TILES: the tile lies in the block of state
    `state`, from its row r0 and column c0. GATHER: each element loads its block's state from its query's states
    row state_rows2 (States + b, head offsets)."""
    if BLOCK_MASK == BLOCK_MASK_TILES:
        if state >= 2:
            if KEYS_FIRST:
                keep = tl.trans(_tile_bits(Bits, state, r0, c0, block_q, bits_row, s.shape[1], s.shape[0]))
            else:
                keep = _tile_bits(Bits, state, r0, c0, block_q, bits_row, s.shape[0], s.shape[1])
            s = tl.where(keep, s, float("-inf"))
    if BLOCK_MASK == BLOCK_MASK_GATHER:
        in2 = ok2 & (n2 < seqlen_k)
        st = tl.load(state_rows2 + (i2 // block_q).to(tl.int64) * stride_stq + (n2 // block_k).to(tl.int64)
                     * stride_stk, mask=in2, other=0)
        keep = (st == 1) | _allowed_bit(Bits, st, i2 % block_q, n2 % block_k, block_q, bits_row, in2 & (st >= 2))
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def span_run(lo, full_lo, full_hi, hi, start, size):
    """TILES: a span [start, start + size) cut to the band's blocks [lo, hi): -> (run_lo, run_hi, banded), banded where
    it reaches outside [full_lo, full_hi) and so needs the per-element band and length check. One run per span, its
    check a uniform branch, rather than the dense path's three unrolled runs: one copy of the loop body per kernel,
    within the registers of the default tiles."""
    return tl.maximum(lo, start), tl.minimum(hi, start + size), (start < full_lo) | (start + size > full_hi)


@triton.jit
def visits(Lists, States, b, head, row, stride_lib, stride_lih, stride_lir, stride_stb, stride_sth):
    """TILES: -> (number of blocks to visit in list row `row` of (b, head), that list row, the states of (b, head))."""
    list_row = Lists + b.to(tl.int64) * stride_lib + head.to(tl.int64) * stride_lih + row.to(tl.int64) * stride_lir
    return tl.load(list_row), list_row, States + b.to(tl.int64) * stride_stb + head.to(tl.int64) * stride_sth


@triton.jit
def span(list_row, j, state_row, row, stride_row, stride_entry, block_entry):
    """TILES: entry j of a visit list -> (its block's state, the block's first index along the visited dim).
    state_row + row * stride_row addresses the program's mask row (or column); entries step by stride_entry."""
    e = tl.load(list_row + 1 + j)
    state = tl.load(state_row + row.to(tl.int64) * stride_row + e.to(tl.int64) * stride_entry)
    return state, e * block_entry
