"""Score math shared by the forward and both backward kernels, so all three see the same scores.

Scores live in the log2 domain, s2 = log2(e) * (softcap(scale * q.k) + bias), so softmax is exp2 and the
scale folds into one multiply; masked entries are -inf.
Tiles may be (queries, keys) or, in the dK/dV kernel, (keys, queries): the helpers take per-query values
(suffix 2) and key indices already shaped to broadcast to the tile, so one code serves both. `ip` is the
query index shifted for bottom-right alignment, the index the band rule and ALiBi use.
"""
import triton
import triton.language as tl

from .. import _C

LOG2E = tl.constexpr(1.4426950408889634)
# MASK_KIND values, numbered by csrc/params.h (MaskKind); the host checks return each call's. Both float kinds load the
# mask in its own dtype.
MASK_KINDS = _C.mask_kinds()
MASK_NONE = tl.constexpr(MASK_KINDS["MASK_NONE"])
MASK_BOOL = tl.constexpr(MASK_KINDS["MASK_BOOL"])


@triton.jit
def tanh(x):
    # 1 - 2 / (e^2x + 1): saturates to +-1 without overflow, and the interpreter runs it
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def capped(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """q.k -> log2(e) * softcap(scale * q.k)."""
    if HAS_SOFTCAP:
        return (softcap * LOG2E) * tanh(qk * (scale / softcap))
    return qk * (scale * LOG2E)


@triton.jit
def band_and_bounds(ip2, n2, ok2, seqlen_k, window_left, window_right,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """True where key n2 exists and lies in query ip2's window (causal: right == 0); ok2: the query exists."""
    ok = ok2 & (n2 < seqlen_k)
    if HAS_LEFT:
        ok = ok & (n2 >= ip2 - window_left)
    if HAS_RIGHT:
        ok = ok & (n2 <= ip2 + window_right)
    return ok


@triton.jit
def biased(s, ip2, n2, ok2, mask_rows2, stride_mn, slopes2, seqlen_k,
           MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Adds ALiBi and a float mask to s2 (log2 units), and -inf where a bool mask is False: added, as torch applies
    it, so a NaN score stays NaN (a select would turn it into -inf).

    mask_rows2: pointers to each query's mask row; slopes2: float32 ALiBi slopes of each query."""
    if HAS_ALIBI:
        s = s - (slopes2 * LOG2E) * tl.abs(ip2 - n2).to(tl.float32)
    if MASK_KIND != MASK_NONE:
        m_ptrs = mask_rows2 + n2.to(tl.int64) * stride_mn
        in_bounds = ok2 & (n2 < seqlen_k)
        if MASK_KIND == MASK_BOOL:
            keep = tl.load(m_ptrs, mask=in_bounds, other=0) != 0
            s = s + tl.where(keep, 0.0, float("-inf"))
        else:
            s = s + tl.load(m_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    return s


@triton.jit
def dropout_keep(seed, rng_offsets, dropout_p):
    """True where the weight survives; rng_offsets are unique per (batch, head, i, j)."""
    return tl.rand(seed, rng_offsets) >= dropout_p


@triton.jit
def row_terms(Mask, Alibi, Rng, b, b64, head, offs_i, row_ok, H_Q, seqlen_q, seqlen_k,
              stride_mb, stride_mh, stride_mm, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr,
              DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-row inputs of the score math for rows (head, offs_i) of batch b (b64: its index into the tensors):
    -> (mask row pointers, ALiBi slopes, Philox seed, Philox counter of each row's key 0)."""
    mask_rows = Mask + b64 * stride_mb + head.to(tl.int64) * stride_mh + offs_i.to(tl.int64) * stride_mm
    slopes = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slopes += tl.load(Alibi + b * stride_ab + head * stride_ah, mask=row_ok, other=0.0)
    seed = 0
    rng_rows = offs_i.to(tl.int64)
    if DROPOUT:  # each (batch, head, i, j) has its own Philox counter; backward regenerates the same ones
        seed = tl.load(Rng)
        rng_rows = tl.load(Rng + 1) + ((b * H_Q + head).to(tl.int64) * seqlen_q + offs_i) * seqlen_k
    return mask_rows, slopes, seed, rng_rows
