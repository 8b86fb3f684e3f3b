"""Which kernel calls a rank makes for the key/value shard in hand: the blocks of (its query chunks) x (the
shard's key chunks) that the causal band or window lets it see, each mapped onto the kernel's own options.

Global rule (pyattn.inputs): query at position gi may attend key gj iff gi - left <= gj <= gi + right
(-1 = unbounded; causal is right = 0). For a query chunk starting at qa and a key chunk starting at kb, with
local i = gi - qa and j = gj - kb, that is  a <= j - i <= b  with a = qa - kb - left, b = qa - kb + right.
The kernel only takes bands that contain j - i = 0 (left, right >= 0 or -1), so a block whose band lies
wholly above or below the diagonal is trimmed first: rows that see no key and keys no row sees are dropped,
which moves the band onto the diagonal of what is left. Blocks the band misses are not computed at all.
"""
import math
from dataclasses import dataclass, replace

from .layout import rank_chunks


@dataclass(frozen=True)
class Block:
    """Query rows [q0, q1) of this rank's shard against key rows [k0, k1) of the shard in hand."""
    q0: int
    q1: int
    k0: int
    k1: int
    window_left: int  # the kernel's band, in the block's own coordinates (-1 = unbounded)
    window_right: int
    q_pos: int  # global position of query row q0
    k_pos: int  # global position of key row k0
    stream: int  # unique per (query chunk, key chunk) pair: the block's dropout stream

    @property
    def diagonal(self):
        """Queries and keys from the same chunk: ALiBi's |i - j| is the kernel's own."""
        return self.q_pos == self.k_pos and self.q1 - self.q0 == self.k1 - self.k0

    @property
    def unbanded(self):
        return self.window_left < 0 and self.window_right < 0


def _band_block(a, b, rows, cols):
    """Keep rows/cols of a rows x cols block with allowed j - i in [a, b] (floats, +-inf = unbounded).
    -> (r0, r1, c0, c1, left, right) or None when nothing is allowed."""
    r0, r1 = max(0, -b), min(rows, cols - a)
    c0, c1 = max(0, a), min(cols, rows + b)
    if r0 >= r1 or c0 >= c1:
        return None
    a, b = a - c0 + r0, b - c0 + r0  # the band relative to the trimmed block: a <= 0 <= b
    left = -1 if a <= -(r1 - r0 - 1) else int(-a)
    right = -1 if b >= c1 - c0 - 1 else int(b)
    return int(r0), int(r1), int(c0), int(c1), left, right


def _fuse(blocks, axis):
    """Join unbanded neighbours into one call: along "k" the same query rows with touching key ranges, along
    "q" the same keys with touching query rows."""
    def touching(a, b):
        if axis == "k":
            return (a.q0, a.q1) == (b.q0, b.q1) and a.k1 == b.k0
        return (a.k0, a.k1) == (b.k0, b.k1) and a.q1 == b.q0

    out = []
    for blk in sorted(blocks, key=lambda b: (b.q0, b.k0) if axis == "k" else (b.k0, b.q0)):
        if out and out[-1].unbanded and blk.unbanded and touching(out[-1], blk):
            out[-1] = replace(out[-1], q1=blk.q1, k1=blk.k1)
        else:
            out.append(blk)
    return out


def plan(q_rank, kv_rank, world, layout, chunk, window_left, window_right, fuse=True):
    """The blocks q_rank computes against kv_rank's shard: a list of Block, empty when it sees none of it.

    fuse: join unbanded neighbours into one call (not with ALiBi, whose bias depends on each chunk's position).
    """
    lo = -math.inf if window_left < 0 else -window_left
    hi = math.inf if window_right < 0 else window_right
    n_chunks = 2 * world if layout == "zigzag" else world
    blocks = []
    for qi, qc in enumerate(rank_chunks(q_rank, world, layout)):
        for ki, kc in enumerate(rank_chunks(kv_rank, world, layout)):
            d = (qc - kc) * chunk
            band = _band_block(lo + d, hi + d, chunk, chunk)
            if band is None:
                continue
            r0, r1, c0, c1, left, right = band
            blocks.append(Block(qi * chunk + r0, qi * chunk + r1, ki * chunk + c0, ki * chunk + c1, left, right,
                                qc * chunk + r0, kc * chunk + c0, qc * n_chunks + kc))
    return _fuse(_fuse(blocks, "k"), "q") if fuse else blocks
