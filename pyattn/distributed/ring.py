"""Ring attention: each rank keeps its query shard while the key/value shards travel around the ring of ranks;
every rank computes its blocks against the shard in hand while the next shard is already on its way, and merges
the partial results by LSE in float32. Each block is an attention call of its own: its input record (dense_inputs
on its rows, with its own band and ALiBi) chooses its backend (backends.choose), which runs its forward and
backward (a backend with a block backward: the fused ones).
Long shards travel in pieces (blocks.key_pieces), one ring pass per piece, so that a rank holds two pieces
rather than two shards: per-rank memory then falls as 1/P at a fixed sequence length.
The backward makes its own ring passes: K/V travel again, each block's gradients come from its backend's
backward given the *global* out and LSE (so its softmax is already the final one), and the dK/dV
accumulators travel with their piece until they reach its owner.
"""
import torch

from .. import backends, ops
from ..errors import AttentionInputError
from ..inputs import dense_inputs
from .blocks import Block, key_pieces, plan
from .call import named_errors, sharded_call
from .comm import Ring, timed
from .dtensor import accepts_dtensors
from .layout import rank_chunks

# Keys per travelling piece: at least MIN_PIECE_TOKENS (shorter ones cost more in per-message latency and
# per-call overhead than they save), about PIECES_PER_SHARD to a shard.
MIN_PIECE_TOKENS = 512
PIECES_PER_SHARD = 4


def _accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alibi_one_side(slopes, blk, dtype):
    """ALiBi's -slope * |gi - gj| on a block wholly on one side of the diagonal (side = sign of gi - gj), split
    as -side * slope * (gi - gj) = column term (a float mask, stride 0 over rows) + row term (which only shifts
    the block's LSE): the kernel's own ALiBi would measure |i - j| from the block's corner instead.
    slopes (B, Hq) float32 -> mask (B, Hq, rows, cols), lse shift (B, Hq, rows) float32."""
    side = 1.0 if blk.q_pos > blk.k_pos else -1.0
    rows, cols = blk.q1 - blk.q0, blk.k1 - blk.k0
    s = slopes[:, :, None] * side  # (B, Hq, 1)
    col = s.to(dtype) * torch.arange(cols, device=slopes.device, dtype=dtype)
    row = torch.arange(rows, device=slopes.device, dtype=torch.float32) + float(blk.q_pos - blk.k_pos)
    return col[:, :, None, :].expand(*slopes.shape, rows, cols), -(s * row)


def _piece_rows(x, piece):
    """x (B, H, N/P, E), a piece's row ranges (blocks.key_pieces) -> its rows (B, H, rows, E), contiguous."""
    if len(piece) == 1:
        return x[:, :, piece[0][0]:piece[0][1]].contiguous()
    return torch.cat([x[:, :, a:b] for a, b in piece], 2)


def rank_plan(rank, world, layout, chunk, window_left, window_right, alibi=False):
    """What rank computes in a ring pass over world > 1 ranks with chunks of chunk tokens: the pieces its
    shard travels in (blocks.key_pieces) and, for each piece and ring step, the blocks (blocks.plan).
    ALiBi's bias depends on each chunk's position: whole shards then, and no fusing of neighbouring blocks."""
    shard_len = chunk * len(rank_chunks(rank, world, layout))
    pieces = key_pieces(shard_len, chunk, not alibi, MIN_PIECE_TOKENS, PIECES_PER_SHARD)
    steps = [[plan(rank, (rank - step) % world, world, layout, chunk, window_left, window_right, piece, i, len(pieces),
                   fuse=not alibi) for step in range(world)] for i, piece in enumerate(pieces)]
    return pieces, steps


class _LseMerge:
    """Partial attention results over disjoint key sets -> the result over all of them, rows at a time:
    out = sum_b exp(lse_b - lse) out_b with lse = log sum_b exp(lse_b), in float32 (float64 for float64)."""

    def __init__(self, q, ev):
        B, H, L, _ = q.shape
        self.out = q.new_zeros(B, H, L, ev, dtype=_accumulator_dtype(q.dtype))
        self.lse = q.new_full((B, H, L), float("-inf"), dtype=torch.float32)

    def add(self, q0, q1, out_b, lse_b):
        """out_b (B, H, q1 - q0, Ev), lse_b (B, H, q1 - q0): the block result for rows q0:q1."""
        lse = self.lse[:, :, q0:q1]
        new = torch.logaddexp(lse, lse_b)
        safe = new.masked_fill(new == float("-inf"), 0.0)  # rows no key has reached: weights exp(-inf) = 0, not NaN
        acc = self.out[:, :, q0:q1]  # in place: no temporary of the block's size
        acc.mul_(torch.exp(lse - safe).unsqueeze(-1)).addcmul_(out_b, torch.exp(lse_b - safe).unsqueeze(-1))
        lse.copy_(new)


def _block_backend(block, requested):
    """The backend that runs a block's record: choose()'s, which must also have a block backward (the ring's
    backward takes each block's gradients given the merged out and LSE)."""
    with named_errors("ring_attention"):
        chosen = backends.choose(block, requested)
    if not chosen.block_backward:
        with_one = ", ".join(name for name, b in backends.BACKENDS.items() if b.block_backward)
        raise AttentionInputError(f"ring_attention: backend {chosen.name!r} has no block backward (a block's gradients "
                                  f"given the merged out and LSE of its rows), which the ring's backward needs; "
                                  f"backends with one: {with_one}")
    return chosen


class _RingPass:
    """One ring_attention call: the blocks each ring step computes, the backend of each and the dropout streams
    (one draw per call, one stream per (query chunk, key chunk, piece) block)."""

    def __init__(self, call, q, k, v, requested):
        """q, k, v: this rank's shards; requested: ring_attention's backend argument."""
        inp = self.inp = call.inp
        self.ring = Ring(call.group, call.rank, call.world)
        if call.world == 1:  # the whole sequence, in order: one call, as single-process pyattn makes it
            L = q.shape[2]
            self.pieces = [((0, L),)]
            self.steps = [[[Block(0, L, 0, L, inp.window_left, inp.window_right, 0, 0, 0)]]]
        else:
            self.pieces, self.steps = rank_plan(call.rank, call.world, call.layout, call.chunk, inp.window_left,
                                                inp.window_right, alibi=inp.alibi_slopes is not None)
        # Chosen before any shard travels, so that a refusal leaves no rank waiting for this one. Every piece in
        # hand has the shape, dtype and device of this rank's own rows, so those stand in for it here.
        self.backends = {blk: _block_backend(self._block_inputs(blk, q, k, v)[0], requested)
                         for steps in self.steps for blocks in steps for blk in blocks}
        self.rng = ops.draw_rng_state(inp)

    def _block_inputs(self, blk, q, k, v):
        """q: this rank's shard, k, v: the piece in hand -> the record of what blk computes (its band in its own
        coordinates; off the diagonal, ALiBi as a column mask) and its LSE shift (B, Hq, rows) or None."""
        inp, mask, slopes, shift = self.inp, None, self.inp.alibi_slopes, None
        if slopes is not None and not blk.diagonal:
            mask, shift = _alibi_one_side(slopes, blk, _accumulator_dtype(q.dtype))
            slopes = None
        # blocks run in the shards' dtype (the autograd Function's forward sees the caller's autocast, its backward
        # may not), and the ALiBi mask stays in float32
        with torch.autocast(q.device.type, enabled=False):
            block = dense_inputs(q[:, :, blk.q0:blk.q1], k[:, :, blk.k0:blk.k1], v[:, :, blk.k0:blk.k1],
                                 attn_mask=mask, dropout_p=inp.dropout_p, scale=inp.scale,
                                 enable_gqa=q.shape[1] != k.shape[1], window_size=(blk.window_left, blk.window_right),
                                 softcap=inp.softcap or None, alibi_slopes=slopes,
                                 return_lse=True)  # the merge and the backward need each block's LSE
        return block, shift

    def _block_rng(self, blk):
        """The block's dropout (seed, offset), or None."""
        return None if self.rng is None else self.rng + torch.tensor([0, blk.stream], device=self.rng.device)

    def _pass_on(self, step, kv):
        """Start passing the piece in hand on (unless this is the last step) -> InFlight or None."""
        return self.ring.pass_on(kv) if step + 1 < self.ring.world else None

    def forward(self, q, k, v):
        """This rank's shards q (B, Hq, N/P, E), k, v (B, Hkv, N/P, E|Ev) -> out (B, Hq, N/P, Ev) in their dtype,
        lse (B, Hq, N/P) float32."""
        if self.ring.world == 1:
            blk = self.steps[0][0][0]
            return self.backends[blk].forward(self._block_inputs(blk, q, k, v)[0], self._block_rng(blk))
        merge = _LseMerge(q, v.shape[-1])
        for piece, steps in zip(self.pieces, self.steps):
            self._forward_piece(piece, steps, q, k, v, merge)
        return merge.out.to(q.dtype), merge.lse

    def _forward_piece(self, piece, steps, q, k, v, merge):
        """One ring pass of a piece: this rank's rows of it, then each earlier rank's in turn (each freed as soon as
        it has been used and passed on)."""
        kv = (_piece_rows(k, piece), _piece_rows(v, piece))
        for step, blocks in enumerate(steps):
            in_flight = self._pass_on(step, kv)
            with timed("compute_s"):
                for blk in blocks:
                    self._forward_block(blk, q, kv, merge)
            if in_flight is not None:
                kv = in_flight.wait()

    def _forward_block(self, blk, q, kv, merge):
        """(A function of its own so that the block's output is freed before the next one is computed.)"""
        block, shift = self._block_inputs(blk, q, *kv)
        out_b, lse_b = self.backends[blk].forward(block, self._block_rng(blk))
        merge.add(blk.q0, blk.q1, out_b, lse_b if shift is None else lse_b + shift)

    def _backward_block(self, blk, q, kv, out, lse, dout, dlse, grads):
        """Adds one block's dq, dk, dv to grads = (dq of the shard, dk, dv of the piece in hand), given the global
        out (B, Hq, N/P, Ev), lse (B, Hq, N/P), dout (B, Hq, N/P, Ev) and dlse (B, Hq, N/P) or None; kv: the
        piece in hand (k, v).

        The block backward takes the global LSE, so the block's softmax is the final one. In float64 the CPU
        kernel re-derives each row's LSE from the keys it is given (to undo the float32 rounding of lse),
        which would renormalize over this block alone: there, it gets the block's own LSE and dout, dlse
        scaled by the block's share exp(lse_block - lse), which gives the same gradients."""
        rows = slice(blk.q0, blk.q1)
        out, lse, dout, dlse = (None if t is None else t[:, :, rows] for t in (out, lse, dout, dlse))
        block, shift = self._block_inputs(blk, q, *kv)
        backend, rng = self.backends[blk], self._block_rng(blk)
        if q.dtype == torch.float64:
            _, lse_block = backend.forward(block, rng)
            share = torch.exp((lse_block if shift is None else lse_block + shift) - lse).nan_to_num_(0.0)
            dout, lse = dout * share.unsqueeze(-1).to(dout.dtype), lse_block
            dlse = None if dlse is None else dlse * share
        elif shift is not None:
            lse = lse - shift
        dq, dk, dv = grads
        dq_b, dk_b, dv_b = backend.backward(block, dout, out, lse, dlse, rng)
        dq[:, :, rows] += dq_b
        dk[:, :, blk.k0:blk.k1] += dk_b
        dv[:, :, blk.k0:blk.k1] += dv_b

    def backward(self, q, k, v, out, lse, dout, dlse):
        """Gradients for this rank's q, k, v shards, given out/lse of forward and dout (B, Hq, N/P, Ev) and
        dlse (B, Hq, N/P) (either may be None: its output was not used)."""
        dout = torch.zeros_like(out) if dout is None else dout
        if self.ring.world == 1:
            blk = self.steps[0][0][0]
            return self.backends[blk].backward(self._block_inputs(blk, q, k, v)[0], dout, out, lse, dlse,
                                               self._block_rng(blk))
        dq = torch.zeros(q.shape, dtype=_accumulator_dtype(q.dtype), device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for piece, steps in zip(self.pieces, self.steps):
            dk_piece, dv_piece = self._backward_piece(piece, steps, q, k, v, out, lse, dout, dlse, dq)
            offset = 0
            for a, b in piece:
                for grad, grad_piece in ((dk, dk_piece), (dv, dv_piece)):
                    grad[:, :, a:b] = grad_piece[:, :, offset:offset + b - a]
                offset += b - a
        return dq.to(q.dtype), dk, dv

    def _backward_piece(self, piece, steps, q, k, v, out, lse, dout, dlse, dq):
        """One ring pass of a piece, adding to dq -> the piece's dk, dv (float32, float64 for float64), summed
        over every rank: they travel with the piece and, after the last step, one hop more back to its owner."""
        acc, dkv_in_flight = _accumulator_dtype(q.dtype), None
        kv = (_piece_rows(k, piece), _piece_rows(v, piece))
        for step, blocks in enumerate(steps):
            in_flight = self._pass_on(step, kv)
            dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in kv)
            with timed("compute_s"):
                for blk in blocks:
                    self._backward_block(blk, q, kv, out, lse, dout, dlse, (dq, dk, dv))
            if dkv_in_flight is not None:  # what the ranks before this one added for the piece in hand
                dk_before, dv_before = dkv_in_flight.wait()
                dk, dv = dk_before.add_(dk), dv_before.add_(dv)
            dkv_in_flight = self.ring.pass_on((dk, dv))
            if in_flight is not None:
                kv = in_flight.wait()
        return dkv_in_flight.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring_pass):
        out, lse = ring_pass.forward(q, k, v)
        ctx.ring_pass = ring_pass
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = ctx.ring_pass.backward(*ctx.saved_tensors, dout, dlse)
        return dq, dk, dv, None


@accepts_dtensors
def ring_attention(q, k, v, *, group=None, is_causal=False, layout="zigzag", window_size=None, softcap=None,
                   alibi_slopes=None, scale=None, enable_gqa=False, dropout_p=0.0, return_lse=False, backend=None):
    """Attention over a sequence split across the ranks of group, by passing K/V shards around a ring.

    q (B, Hq, N/P, E), k (B, Hkv, N/P, E), v (B, Hkv, N/P, Ev): this rank's shards (pyattn.distributed.shard)
    -> out (B, Hq, N/P, Ev), this rank's shard of the output (and with return_lse its lse (B, Hq, N/P) float32).
    Causal masks, windows and ALiBi refer to global positions; the arguments mean what they mean in
    pyattn.scaled_dot_product_attention on the whole sequence. Every rank of group calls it with the same
    arguments and shapes. Dropout: each rank draws one (seed, offset) from its default generator per call and
    every block gets its own stream of it, so a call is reproducible for fixed seeds and world size, but its
    mask is not single-process pyattn's.
    """
    call = sharded_call("ring_attention", q, k, v, group, layout, is_causal, window_size, softcap, alibi_slopes,
                        scale, enable_gqa, dropout_p, return_lse)
    out, lse = _RingAttention.apply(q, k, v, _RingPass(call, q, k, v, backend))
    return (out, lse) if return_lse else out
