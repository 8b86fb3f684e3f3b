"""Which kernel calls a rank makes for the key/value piece in hand (a shard, or a part of one inside a chunk, see
key_pieces): the blocks of (its query chunks) x (the piece's key chunks) that the causal band or window lets
it see, each mapped onto the kernel's own options.

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
    """Query rows [q0, q1) of this rank's shard against key rows [k0, k1) of the piece in hand."""
    q0: int
    q1: int
    k0: int
    k1: int
    window_left: int  # the kernel's band, in the block's own coordinates (-1 = unbounded)
    window_right: int
    q_pos: int  # global position of query row q0
    k_pos: int  # global position of key row k0
    stream: int  # unique per (query chunk, key chunk, piece): the block's dropout stream

    @property
    def diagonal(self):
        """Queries and keys from the same chunk: ALiBi's |i - j| is the kernel's own."""
        return self.q_pos == self.k_pos and self.q1 - self.q0 == self.k1 - self.k0

    @property
    def unbanded(self):
        return self.window_left < 0 and self.window_right < 0

    def pairs(self):
        """The (query, key) pairs the band lets through: the work of the block's kernel call. All rows x cols,
        less those right of the band (j > i + right) and those left of it (j < i - left)."""
        rows, cols = self.q1 - self.q0, self.k1 - self.k0
        right_of = left_of = 0
        if self.window_right >= 0:  # row i has max(0, m - i) of them, m = cols - 1 - right
            m = cols - 1 - self.window_right
            n = max(0, min(rows, m))
            right_of = n * m - n * (n - 1) // 2
        if self.window_left >= 0:  # row i has clamp(i - left, 0, cols) of them
            t = rows - 1 - self.window_left
            left_of = 0 if t <= 0 else t * (t + 1) // 2 if t <= cols else cols * (cols + 1) // 2 + (t - cols) * cols
        return rows * cols - right_of - left_of


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


def _fuse(blocks):
    """Join unbanded neighbours with the same query rows and touching key ranges into one call. (Not along
    queries: that would only grow the call's output, which the merge holds next to its accumulator.)"""
    out = []
    for blk in sorted(blocks, key=lambda b: (b.q0, b.k0)):
        prev = out[-1] if out else None
        if prev and prev.unbanded and blk.unbanded and (prev.q0, prev.q1) == (blk.q0, blk.q1) and prev.k1 == blk.k0:
            out[-1] = replace(prev, k1=blk.k1)
        else:
            out.append(blk)
    return out


def key_pieces(shard_len, chunk, may_split, min_tokens, per_shard):
    """How a shard's keys travel the ring: in pieces, one after another, each on a ring pass of its own, so
    that a rank holds two pieces (the one in use, the next arriving) rather than two shards. -> a list of
    pieces, each a tuple of shard row ranges (a, b), one per chunk, in the order the piece tensor holds them.

    Piece i takes part i of the shard's first chunk and, in zigzag, the mirrored part (counted from the end)
    of its second: a zigzag of its own, so that under a causal mask every rank has the same work at every
    step of every piece, as with whole shards (ranks wait for each other at each step), and every piece the
    same work. (Pieces that each lie in one chunk leave ranks waiting: 13% slower at P = 2, N = 65536.)
    About per_shard pieces of at least min_tokens keys; one (the whole shard) when may_split is False (ALiBi: a
    block's bias needs whole chunks) or the shard is short."""
    per_rank = shard_len // chunk
    n = max(1, min(per_shard, shard_len // min_tokens)) if may_split else 1
    bounds = [chunk * i // n for i in range(n + 1)]
    return [tuple((c * chunk + bounds[j], c * chunk + bounds[j + 1])
                  for c, j in enumerate((i, n - 1 - i)[:per_rank])) for i in range(n)]


def plan(q_rank, kv_rank, world, layout, chunk, window_left, window_right, piece=None, index=0, n_pieces=1,
         fuse=True):
    """The blocks q_rank computes against a piece of kv_rank's shard (key_pieces; default: the whole shard):
    a list of Block with k0, k1 counting the piece's rows, empty when it sees none of them.

    index, n_pieces: the piece's index and the shard's number of pieces, so that every (query chunk, key
    chunk, piece) has its own dropout stream.
    fuse: join unbanded neighbours into one call (not with ALiBi, whose bias depends on each chunk's position).
    """
    lo = -math.inf if window_left < 0 else -window_left
    hi = math.inf if window_right < 0 else window_right
    chunks = rank_chunks(kv_rank, world, layout)
    n_chunks = 2 * world if layout == "zigzag" else world
    piece = piece or ((0, chunk * len(chunks)),)
    blocks = []
    for qi, qc in enumerate(rank_chunks(q_rank, world, layout)):
        offset = 0  # the piece's row where range (a, b) starts
        for a, b in piece:
            for ki, kc in enumerate(chunks):
                k_lo, k_hi = max(a, ki * chunk), min(b, (ki + 1) * chunk)  # shard rows of this chunk in the range
                if k_lo >= k_hi:
                    continue
                k_start = kc * chunk + k_lo - ki * chunk  # global position of key row k_lo
                d = qc * chunk - k_start
                band = _band_block(lo + d, hi + d, chunk, k_hi - k_lo)
                if band is None:
                    continue
                r0, r1, c0, c1, left, right = band
                k0 = offset + k_lo - a
                blocks.append(Block(qi * chunk + r0, qi * chunk + r1, k0 + c0, k0 + c1, left, right,
                                    qc * chunk + r0, k_start + c0, (qc * n_chunks + kc) * n_pieces + index))
            offset += b - a
    return _fuse(blocks) if fuse else blocks
