"""torch's BlockMask -> the kernels' block structure (block_states, block_bits, block_q, block_k), as in
/tmp/blockmask-interface.md and docs/semantics.md.

The meaning is torch's compiled flex_attention: only the blocks a BlockMask lists are visited; its full blocks
(full_kv_num_blocks / full_kv_indices) attend everywhere with no mask_mod; its partial blocks (kv_num_blocks /
kv_indices) apply mask_mod, at the call's real (b, h) even where the BlockMask was made with B or H = 1. Every other
block is empty. (torch's eager flex_attention ignores the block structure and applies mask_mod everywhere; the two
agree for masks from create_block_mask.)

mask_mod runs once per partial block, in chunks of a bounded number of elements, into one bit per (query, key):
memory O(blocks + partial blocks * block_q * block_k / 8), never O(L * S). A user passes one BlockMask to every layer,
so each conversion is cached on the BlockMask object (weakly) by the call's sizes and device.
"""
import math
import sys
import weakref
from typing import NamedTuple, Optional

import torch

from .errors import AttentionInputError, AttentionTypeError

FULL = 1  # block_states: 0 = empty, 1 = full, 2 + i = partial, masked by block_bits[i]
PARTIAL = 2
CHUNK_ELEMENTS = 1 << 22  # (query, key) pairs per mask_mod evaluation: bounds its temporaries (~4M bools)
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)  # LSB first


class BlockSparse(NamedTuple):
    states: torch.Tensor  # (Bm, Hm, Qb, Kb) int32, Bm in {1, B}, Hm in {1, Hq}
    bits: Optional[torch.Tensor]  # (P, block_q, ceil(block_k / 8)) uint8, None when P == 0
    block_q: int
    block_k: int


def flex_module():
    """torch.nn.attention.flex_attention where torch has loaded it, else None: a BlockMask cannot exist before, and
    importing it with pyattn would load torch._dynamo (as validate.is_causal_bias explains)."""
    return sys.modules.get("torch.nn.attention.flex_attention")


def is_block_mask(x):
    module = flex_module()
    return module is not None and isinstance(x, module.BlockMask)


def block_sizes(block_mask):
    size = block_mask.BLOCK_SIZE
    block_q, block_k = (size, size) if isinstance(size, int) else size
    return int(block_q), int(block_k)


def check(block_mask, B, Hq, L, S, device):
    """The BlockMask against the call: 4-D, batch 1|B, heads 1|Hq, made for exactly (L, S) as torch asks, on the
    device, with a block row for each query block."""
    block_q, block_k = block_sizes(block_mask)
    shape = tuple(block_mask.kv_indices.shape)
    if block_mask.mask_mod is getattr(flex_module(), "_sliced_mask_mod_error", None):
        raise AttentionInputError("Cannot use mask_mod from a sliced BlockMask: slicing resets it; set "
                                  "sliced.mask_mod from the original BlockMask's mask_mod")
    if block_mask.kv_indices.dim() != 4:
        raise AttentionInputError(f"block_mask must be 4-D (B, H, query blocks, key blocks), got kv_indices {shape} "
                                  "(index a BlockMask with ranges, not ints, to keep its dims)")
    Bm, Hm = shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise AttentionInputError(f"block_mask batch and heads must be 1 or the query's (B, Hq) = ({B}, {Hq}), got "
                                  f"block_mask.shape {tuple(block_mask.shape)}")
    if tuple(block_mask.seq_lengths) != (L, S):
        raise AttentionInputError(f"block_mask was created for seq_lengths {tuple(block_mask.seq_lengths)} but got "
                                  f"q_len={L} and kv_len={S}: make a new block mask, or block_mask._adjust({L}, {S})")
    if block_q < 1 or block_k < 1:
        raise AttentionInputError(f"block_mask.BLOCK_SIZE must be >= 1, got {block_mask.BLOCK_SIZE}")
    if shape[2] < math.ceil(L / block_q):
        raise AttentionInputError(f"block_mask has {shape[2]} query block rows but q_len={L} needs "
                                  f"{math.ceil(L / block_q)} of BLOCK_SIZE {block_q} (kv_indices {shape})")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        t = getattr(block_mask, name)
        if t is None:
            continue
        if t.device != device:
            raise AttentionInputError(f"block_mask.{name} is on {t.device} but query is on {device}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise AttentionTypeError(f"block_mask.{name} must be an integer tensor, got {t.dtype}")


def _listed(num_blocks, indices, rows, cols):
    """(Bm, Hm, rows, cols) bool: the blocks a (num_blocks, indices) pair lists (indices past cols are dropped: the
    kernels never reach keys past S)."""
    num_blocks, indices = num_blocks[:, :, :rows], indices[:, :, :rows].long()
    used = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    target = torch.where(used & (indices >= 0) & (indices < cols), indices, cols)
    listed = torch.zeros(*indices.shape[:3], cols + 1, dtype=torch.bool, device=indices.device)
    listed.scatter_(-1, target, True)
    return listed[..., :cols]


def _probe_dependence(mask_mod, B, Hq, device):
    """Whether mask_mod's result depends on b and on h, read from its shape on broadcast index tensors; None when
    mask_mod does not take tensors of several elements (written for scalars: evaluated under vmap then)."""
    b = torch.arange(B, device=device, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=device, dtype=torch.int32).view(1, Hq, 1, 1)
    q = torch.zeros(1, 1, 2, 1, device=device, dtype=torch.int32)
    kv = torch.zeros(1, 1, 1, 2, device=device, dtype=torch.int32)
    try:
        result = torch.as_tensor(mask_mod(b, h, q, kv))
        shape = (1,) * (4 - result.dim()) + tuple(result.shape)
        torch.broadcast_shapes(shape, (B, Hq, 2, 2))
    except Exception:  # a mask_mod for scalars (Python control flow, .item(), ...) fails here in its own way
        return None
    return shape[0] > 1, shape[1] > 1


def _vmapped(mask_mod):
    """mask_mod over 1-D (b, h, q_idx, kv_idx) of one length, element by element, as torch's math path maps it."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    mapped = torch.vmap(mask_mod, in_dims=(0, 0, 0, 0))

    def run(b, h, q, kv):
        shape = torch.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape)
        flat = [t.expand(shape).reshape(-1) for t in (b, h, q, kv)]
        with TransformGetItemToIndex():
            return mapped(*flat).reshape(shape)
    return run


def _pack(allowed):
    """allowed (P, block_q, block_k) bool -> (P, block_q, ceil(block_k / 8)) uint8, LSB first."""
    P, rows, cols = allowed.shape
    padded = torch.nn.functional.pad(allowed, (0, (-cols) % 8)).view(P, rows, -1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=allowed.device)
    return (padded.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _evaluate(mask_mod, blocks, block_q, block_k, L, S):
    """blocks (P, 4) int64 rows (b, h, qb, kb) -> allowed (P, block_q, block_k) bool by mask_mod, False past L or S
    (indices are clamped there, so mask_mod never sees an index it was not made for)."""
    device = blocks.device
    rows = torch.arange(block_q, device=device)
    cols = torch.arange(block_k, device=device)
    q = blocks[:, 2, None, None] * block_q + rows[None, :, None]  # (P, block_q, 1)
    kv = blocks[:, 3, None, None] * block_k + cols[None, None, :]  # (P, 1, block_k)
    b, h = blocks[:, 0, None, None], blocks[:, 1, None, None]
    args = [t.to(torch.int32) for t in (b, h, q.clamp(max=L - 1), kv.clamp(max=S - 1))]
    allowed = torch.as_tensor(mask_mod(*args)).to(torch.bool)
    return allowed.expand(blocks.shape[0], block_q, block_k) & (q < L) & (kv < S)


def convert(block_mask, B, Hq, L, S, device):
    """A BlockMask checked against the call (check()) -> BlockSparse. Partial blocks whose bits come out all True or
    all False become full or empty (the same attention, fewer bits)."""
    block_q, block_k = block_sizes(block_mask)
    Qb, Kb = math.ceil(L / block_q), math.ceil(S / block_k)
    partial = _listed(block_mask.kv_num_blocks, block_mask.kv_indices, Qb, Kb)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = _listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, Qb, Kb)
    partial &= ~full  # a block listed twice is a malformed BlockMask: it counts once, as full
    module = flex_module()
    mask_mod = block_mask.mask_mod
    if mask_mod is module.noop_mask:  # from_kv_blocks' default: every listed block is full
        full, partial = full | partial, torch.zeros_like(partial)
    vmapped = False
    if bool(partial.any()):
        depends = _probe_dependence(mask_mod, B, Hq, device)
        if depends is None:
            mask_mod, depends, vmapped = _vmapped(mask_mod), (B > 1, Hq > 1), True
        # mask_mod's b and h are the call's: a BlockMask broadcast over a dim mask_mod reads is expanded along it
        sizes = (B if depends[0] else partial.shape[0], Hq if depends[1] else partial.shape[1], Qb, Kb)
        partial, full = partial.expand(sizes), full.expand(sizes)
    states = full.to(torch.int32) * FULL
    blocks = partial.nonzero()  # (P, 4): b, h, qb, kb
    if blocks.shape[0] == 0:
        return BlockSparse(states, None, block_q, block_k)
    per_chunk = max(1, CHUNK_ELEMENTS // (block_q * block_k))
    bits, kinds = [], []
    for start in range(0, blocks.shape[0], per_chunk):
        chunk = blocks[start:start + per_chunk]
        try:
            allowed = _evaluate(mask_mod, chunk, block_q, block_k, L, S)
        except Exception:  # took the probe's shapes but not a block's: a mask_mod for scalars after all
            if vmapped:
                raise
            mask_mod, vmapped = _vmapped(mask_mod), True
            allowed = _evaluate(mask_mod, chunk, block_q, block_k, L, S)
        in_bounds = (L - chunk[:, 2] * block_q).clamp(max=block_q) * (S - chunk[:, 3] * block_k).clamp(max=block_k)
        count = allowed.sum((1, 2))
        kinds.append(torch.where(count == 0, 0, torch.where(count == in_bounds, FULL, PARTIAL)))
        bits.append(_pack(allowed)[kinds[-1] == PARTIAL])
    kinds = torch.cat(kinds)
    still_partial = kinds == PARTIAL
    # partial i (in nonzero's row-major order) reads bits[i]
    kinds[still_partial] = PARTIAL + torch.arange(int(still_partial.sum()), device=device)
    states = states.contiguous()
    states[tuple(blocks.T)] = kinds.to(torch.int32)
    packed = torch.cat(bits)
    return BlockSparse(states, packed if packed.shape[0] else None, block_q, block_k)


_CACHE = weakref.WeakKeyDictionary()  # BlockMask -> (key, what the key names, BlockSparse): its last conversion
_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def _key(block_mask, B, Hq, L, S, device):
    """What a conversion depends on besides the BlockMask object: the call's sizes, and the BlockMask's fields a user
    may reassign (mask_mod and seq_lengths after slicing, as torch's docs show) or whose tensors may change in place.
    Objects are named by id: the cache entry keeps them alive, so an id cannot be reused while it is compared."""
    tensors = tuple(getattr(block_mask, name) for name in _TENSORS)
    versions = tuple((id(t), t._version) if t is not None else None for t in tensors)
    key = (B, Hq, L, S, str(device), id(block_mask.mask_mod), tuple(block_mask.seq_lengths),
           tuple(block_sizes(block_mask)), versions)
    return key, (block_mask.mask_mod, tensors)


def block_sparse(block_mask, B, Hq, L, S, device):
    """check() then convert(), cached per BlockMask object: a model calls every layer with one BlockMask and the same
    sizes, and a new key (another batch, a reassigned mask_mod) replaces the entry. A mask_mod that reads a tensor
    changed in place after the first call is not seen again: make a new BlockMask then (as create_block_mask's blocks
    would be stale too)."""
    check(block_mask, B, Hq, L, S, device)
    if torch.compiler.is_compiling():
        return convert(block_mask, B, Hq, L, S, device)
    key, named = _key(block_mask, B, Hq, L, S, device)
    cached = _CACHE.get(block_mask)
    if cached is None or cached[0] != key:
        cached = _CACHE[block_mask] = (key, named, convert(block_mask, B, Hq, L, S, device))
    return cached[2]


def dense(states, bits, block_q, block_k, B, Hq, L, S):
    """The block structure as a dense (B, Hq, L, S) bool mask, True = may attend: the O(L * S) reference. Computed
    at the states' own (1|B, 1|Hq) and broadcast (stride 0) to the rest."""
    per_element = states.repeat_interleave(block_q, dim=2)[:, :, :L].repeat_interleave(block_k, dim=3)[..., :S]
    allowed = per_element == FULL
    if bits is not None:
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        unpacked = ((bits[..., None] >> shifts) & 1).bool().flatten(-2)  # (P, block_q, 8 * ceil(block_k / 8))
        i = torch.arange(L, device=states.device)[:, None] % block_q
        j = torch.arange(S, device=states.device)[None, :] % block_k
        index = (per_element - PARTIAL).clamp(min=0)
        allowed |= (per_element >= PARTIAL) & unpacked[index, i, j]
    return allowed.expand(B, Hq, L, S)
