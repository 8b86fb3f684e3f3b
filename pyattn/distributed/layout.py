"""How a sequence of N tokens is split over the P ranks of a process group, and which global positions a
shard holds.

"contiguous": rank r holds chunk r of P equal chunks.
"zigzag": the sequence is cut in 2P equal chunks and rank r holds chunks r and 2P-1-r (in that order), so
under causal masking every rank has the same work: an early chunk sees few keys, its partner many. It is
also torch's context_parallel head-tail order.
"""
import torch
import torch.distributed as dist
from ..errors import AttentionInputError, AttentionTypeError

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise AttentionInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def group_rank_and_size(group, caller):
    """(rank in group, size of group); a clear error when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{caller} needs torch.distributed initialized (torch.distributed.init_process_group, "
                           f"e.g. under torchrun)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise AttentionInputError(f"{caller}: this process (global rank {dist.get_rank()}) is not a member of group")
    return rank, dist.get_world_size(group)


def rank_chunks(rank, world, layout):
    """The global chunk ids rank holds, in shard order; chunks are N / (P or 2P) tokens."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def chunk_count(world, layout):
    return world * len(rank_chunks(0, world, layout))


def shard_order(world, layout):
    """Global chunk ids in the order the shards of ranks 0..P-1 hold them, one after another."""
    return [c for r in range(world) for c in rank_chunks(r, world, layout)]


def _chunk_len(n, world, layout, what):
    count = chunk_count(world, layout)
    if n % count:
        raise AttentionInputError(f"{what}: a sequence of {n} tokens cannot be split by layout {layout!r} over {world} ranks: "
                         f"it needs a multiple of {count} tokens ({count} equal chunks); pad the sequence (and mask "
                         f"the padding) or change its length")
    return n // count


def positions(seq_len, *, group=None, layout="zigzag", device=None):
    """The global positions (N/P,) int64 of the tokens in this rank's shard of a sequence of seq_len tokens:
    what positional embeddings (learned, RoPE) of a sharded sequence must use."""
    check_layout(layout)
    rank, world = group_rank_and_size(group, "positions")
    chunk = _chunk_len(seq_len, world, layout, "positions")
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device)
                      for c in rank_chunks(rank, world, layout)])


def _seq_dim(x, seq_dim, caller):
    if not isinstance(x, torch.Tensor):
        raise AttentionTypeError(f"{caller}: x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= seq_dim < x.dim():
        raise AttentionInputError(f"{caller}: seq_dim {seq_dim} is out of range for x of shape {tuple(x.shape)}")
    return seq_dim % x.dim()


def shard_tensor(x, rank, world, layout, seq_dim):
    """x (..., N, ...) -> rank's shard (..., N/P, ...) along seq_dim, a new tensor (differentiable)."""
    chunk = _chunk_len(x.shape[seq_dim], world, layout, f"shard of x with shape {tuple(x.shape)}")
    return torch.cat([x.narrow(seq_dim, c * chunk, chunk) for c in rank_chunks(rank, world, layout)], seq_dim)


def reorder(x, world, layout, seq_dim, to_natural):
    """The concatenated shards of ranks 0..P-1 (shard order) <-> the sequence in natural order, along seq_dim."""
    if layout == "contiguous":
        return x
    order = shard_order(world, layout)
    pieces = x.chunk(len(order), seq_dim)
    if to_natural:
        return torch.cat([pieces[order.index(c)] for c in range(len(order))], seq_dim)
    return torch.cat([pieces[c] for c in order], seq_dim)


def shard(x, *, group=None, layout="zigzag", seq_dim=-2):
    """The full tensor x (..., N, ...) -> this rank's shard (..., N/P, ...) along seq_dim, by layout.

    A new tensor; differentiable. N must split into P (contiguous) or 2P (zigzag) equal chunks, else a
    ValueError says so: nothing is padded.
    """
    check_layout(layout)
    dim = _seq_dim(x, seq_dim, "shard")
    rank, world = group_rank_and_size(group, "shard")
    return shard_tensor(x, rank, world, layout, dim)


class _Unshard(torch.autograd.Function):
    """all_gather of the shards into the full sequence; backward sums every rank's gradient of the full tensor
    and hands each rank its shard of it (what torch.distributed.nn's all_gather does, on any backend)."""

    @staticmethod
    def forward(ctx, x, group, rank, world, layout, dim):
        ctx.args = group, rank, world, layout, dim
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return reorder(torch.cat(parts, dim), world, layout, dim, to_natural=True)

    @staticmethod
    def backward(ctx, grad):
        group, rank, world, layout, dim = ctx.args
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return shard_tensor(grad, rank, world, layout, dim), None, None, None, None, None


def unshard(x, *, group=None, layout="zigzag", seq_dim=-2):
    """This rank's shard (..., N/P, ...) -> the full tensor (..., N, ...) in natural order, on every rank.

    Every rank must call it with a shard of the same shape (it is a collective). Differentiable: the gradient
    of a rank's shard is the sum over ranks of their gradients of the full tensor at its positions.
    """
    check_layout(layout)
    dim = _seq_dim(x, seq_dim, "unshard")
    rank, world = group_rank_and_size(group, "unshard")
    if layout == "zigzag" and x.shape[dim] % 2:
        raise AttentionInputError(f"unshard: a zigzag shard holds two equal chunks, so its length must be even; got x of shape "
                         f"{tuple(x.shape)} (seq_dim {seq_dim})")
    return _Unshard.apply(x, group, rank, world, layout, dim)
