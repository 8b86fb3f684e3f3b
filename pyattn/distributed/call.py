"""The arguments of ring_attention and ulysses_attention, validated once: this rank's shards as pyattn's input
record (dense_inputs checks what any attention call must satisfy), and where they sit in the sequence (what only
shards must)."""
import contextlib
from dataclasses import dataclass

from ..errors import AttentionInputError
from ..inputs import AttnInputs, dense_inputs
from .layout import check_layout, group_rank_and_size, rank_chunks


@dataclass
class ShardedCall:
    inp: AttnInputs  # this rank's shards: q (B, Hq, N/P, E), k (B, Hkv, N/P, E), v (B, Hkv, N/P, Ev)
    group: object
    rank: int
    world: int
    layout: str
    chunk: int  # tokens per chunk: N/P (contiguous) or N/(2P) (zigzag)

    @property
    def seq_len(self):
        return self.chunk * self.world * len(rank_chunks(0, self.world, self.layout))


@contextlib.contextmanager
def named_errors(caller):
    """pyattn's input errors raised inside, with the caller's name in front (theirs name only tensors)."""
    try:
        yield
    except AttentionInputError as e:
        raise type(e)(f"{caller}: {e}") from None


def sharded_call(caller, q, k, v, group, layout, is_causal, window_size, softcap, alibi_slopes, scale, enable_gqa,
                 dropout_p, return_lse):
    check_layout(layout)
    with named_errors(caller):
        inp = dense_inputs(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                           window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise AttentionInputError(f"{caller}: {name} must be this rank's 4-D shard (B, H, N/P, D), got shape "
                                      f"{tuple(t.shape)}")
    # shards are not broadcast: each rank passes its rows of every head
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    B, Hq, L, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[2] != L:
        raise AttentionInputError(f"{caller}: q, k and v must be shards of one sequence, (B, Hq, N/P, E), "
                                  f"(B, Hkv, N/P, E) and (B, Hkv, N/P, Ev) with the same B, Hkv and N/P; got {shapes}")
    if k.shape[1] != Hq and not enable_gqa:
        raise AttentionInputError(f"{caller}: k and v have {k.shape[1]} heads but q has {Hq}: pass enable_gqa=True "
                                  f"(query heads a multiple of key/value heads); got {shapes}")
    rank, world = group_rank_and_size(group, caller)
    per_rank = len(rank_chunks(rank, world, layout))
    if L % per_rank or L == 0:
        raise AttentionInputError(f"{caller}: a {layout!r} shard holds {per_rank} equal chunk(s), so its length must "
                                  f"be a positive multiple of {per_rank}; got {shapes}")
    return ShardedCall(inp, group, rank, world, layout, L // per_rank)
