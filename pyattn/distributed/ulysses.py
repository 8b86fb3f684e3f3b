"""All-to-all ("Ulysses") attention: re-shard q, k, v from sequence shards to head shards, run pyattn on the
whole sequence for this rank's heads, and re-shard the output (and LSE) back. Two all-to-alls each way;
every feature and backend of pyattn.scaled_dot_product_attention works, because it sees the whole sequence.
"""
import contextlib

import torch
import torch.distributed as dist

from ..errors import AttentionInputError
from ..functional import scaled_dot_product_attention
from .call import sharded_call
from .dtensor import accepts_dtensors
from .layout import reorder


def _seq_to_heads(x, group, world, layout):
    """Sequence shard (B, H, N/P, D) -> all N tokens of this rank's H/P heads, in natural order."""
    B, H, L, D = x.shape
    send = x.reshape(B, world, H // world, L, D).transpose(0, 1).contiguous()  # (P, B, H/P, N/P, D): row p to rank p
    got = torch.empty_like(send)  # (P, B, H/P, N/P, D): row p from rank p
    dist.all_to_all_single(got, send, group=group)
    return reorder(got.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * L, D), world, layout, 2, to_natural=True)


def _heads_to_seq(x, group, world, layout):
    """All N tokens of this rank's heads (B, H/P, N, D), natural order -> sequence shard (B, H, N/P, D)."""
    B, h, N, D = x.shape
    x = reorder(x, world, layout, 2, to_natural=False)
    send = x.reshape(B, h, world, N // world, D).permute(2, 0, 1, 3, 4).contiguous()  # row p: rank p's shard
    got = torch.empty_like(send)  # row p: heads of rank p
    dist.all_to_all_single(got, send, group=group)
    return got.transpose(0, 1).reshape(B, world * h, N // world, D)


class _Reshard(torch.autograd.Function):
    """Sequence shards -> head shards (to_heads) or back; the gradient takes the way back."""

    @staticmethod
    def forward(ctx, x, to_heads, group, world, layout):
        ctx.args = not to_heads, group, world, layout
        return _reshard(x, to_heads, group, world, layout)

    @staticmethod
    def backward(ctx, grad):
        return _reshard(grad, *ctx.args), None, None, None, None


def _reshard(x, to_heads, group, world, layout):
    return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world, layout)


@contextlib.contextmanager
def _rank_dropout_stream(device, rank):
    """Dropout draws from a generator seeded per rank (from one draw of the default one), so head groups on
    different ranks get different masks even when every rank was seeded alike; the default generator moves on
    by that one draw, as a single-process call's does."""
    seed = int(torch.randint(2**62, (1,), device=device))
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        _default_generator(device).manual_seed(seed + rank)
        yield


def _default_generator(device):
    if device.type == "cpu":
        return torch.default_generator
    module = torch.get_device_module(device.type)
    return module.default_generators[module.current_device() if device.index is None else device.index]


@accepts_dtensors
def ulysses_attention(q, k, v, *, group=None, is_causal=False, layout="zigzag", window_size=None, softcap=None,
                      alibi_slopes=None, scale=None, enable_gqa=False, dropout_p=0.0, return_lse=False, backend=None):
    """Attention over a sequence split across the ranks of group, by all-to-all over heads (DeepSpeed Ulysses).

    The arguments and results of pyattn.distributed.ring_attention: this rank's shards in, its shard of the
    output out. Query heads and key/value heads must both be multiples of the group size P. Dropout: each
    rank's heads draw from a stream seeded by one draw of its default generator plus its rank.
    """
    call = sharded_call("ulysses_attention", q, k, v, group, layout, is_causal, window_size, softcap, alibi_slopes,
                        scale, enable_gqa, dropout_p, return_lse)
    inp, world, rank = call.inp, call.world, call.rank
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % world or Hkv % world:
        raise AttentionInputError(f"ulysses_attention splits heads over the {world} ranks of group: query heads ({Hq}) and "
                         f"key/value heads ({Hkv}) must be multiples of {world}; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} (ring_attention has no such limit)")
    qh, kh, vh = (_Reshard.apply(t, True, call.group, world, call.layout) for t in (q, k, v))
    heads = slice(rank * Hq // world, (rank + 1) * Hq // world)
    slopes = None if inp.alibi_slopes is None else inp.alibi_slopes[:, heads]
    dropout = _rank_dropout_stream(q.device, rank) if inp.dropout_p > 0 else contextlib.nullcontext()
    with dropout:
        res = scaled_dot_product_attention(
            qh, kh, vh, dropout_p=inp.dropout_p, is_causal=is_causal, scale=inp.scale, enable_gqa=enable_gqa,
            window_size=window_size, softcap=softcap, alibi_slopes=slopes, return_lse=return_lse, backend=backend)
    back = lambda t: _Reshard.apply(t, False, call.group, world, call.layout)  # noqa: E731
    if not return_lse:
        return back(res)
    out, lse = res
    return back(out), back(lse.unsqueeze(-1)).squeeze(-1)
