"""Which rows a program owns and which key blocks it must visit: shared by every kernel.

Forward and dQ programs own BLOCK_M "packed rows" of one KV head: row r is query i = r % L of query head
kv_head * GROUP + r // L, so the GROUP query heads that share K/V tiles read them once (GQA without copies,
and decode shapes with L = 1 still fill a tensor-core tile).
"""
import triton
import triton.language as tl


@triton.jit
def seq_span(CuSeq, b, seqlen, VARLEN: tl.constexpr):
    """-> (first row of sequence b in the packed tensor, its length); dense inputs start at 0."""
    if VARLEN:
        start = tl.load(CuSeq + b)
        return start, tl.load(CuSeq + b + 1) - start
    return tl.full([], 0, tl.int32), seqlen


@triton.jit
def cache_span(SeqK, Leftpad, b, HAS_LEFTPAD: tl.constexpr):
    """KV-cache mode: sequence b's keys are cache positions [leftpad[b] (or 0), seqlens_k[b]):
    -> (position of its key 0, its number of keys)."""
    end = tl.load(SeqK + b)
    start = tl.full([], 0, tl.int32)
    if HAS_LEFTPAD:
        start = tl.load(Leftpad + b)
    return start, end - start


@triton.jit
def key_rows(offs_n, n_ok, Pages, k_start, page_size, stride_kp, stride_kn, stride_vp, stride_vn,
             PAGED: tl.constexpr):
    """int64 offsets of keys offs_n in K and in V from their sequence's base: rows of one tensor or, PAGED, cache
    position pos = k_start + n at row pos % page_size of page Pages[pos // page_size] (Pages: the sequence's
    block_table row; stride_kp, stride_vp: the caches' page strides). No gather copy of the cache."""
    if PAGED:
        pos = k_start + offs_n
        page = tl.load(Pages + pos // page_size, mask=n_ok, other=0).to(tl.int64)
        row = (pos % page_size).to(tl.int64)
        return page * stride_kp + row * stride_kn, page * stride_vp + row * stride_vn
    n64 = offs_n.to(tl.int64)
    return n64 * stride_kn, n64 * stride_vn


@triton.jit
def row_block(pid_m, pid_bh, H_Q, H_KV, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, bottom_right,
              VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, PAD_HEADS: tl.constexpr):
    """What a forward or dQ program owns: -> (b, kv_head, group, q_start, len_q, k_start, len_k, row_ok, head,
    offs_i, ip, pitch). Its block is empty when pid_m * BLOCK_M >= group * pitch (see packed_rows)."""
    b = pid_bh // H_KV
    kv_head = pid_bh % H_KV
    group = H_Q // H_KV
    q_start, len_q = seq_span(CuSeqQ, b, seqlen_q, VARLEN)
    k_start, len_k = seq_span(CuSeqK, b, seqlen_k, VARLEN)
    shift = (len_k - len_q) * bottom_right
    pitch = len_q
    if PAD_HEADS:
        pitch = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    row_ok, head, offs_i, ip = packed_rows(pid_m, kv_head, group, len_q, pitch, shift, BLOCK_M, PAD_HEADS)
    return b, kv_head, group, q_start, len_q, k_start, len_k, row_ok, head, offs_i, ip, pitch


@triton.jit
def segment(seg: tl.constexpr, lo, full_lo, full_hi, hi):
    """Bounds of run seg of key (or query) blocks: 0 and 2 are band edges, checked per element; 1 is the
    interior."""
    seg_lo = lo
    seg_hi = full_lo
    if seg == 1:
        seg_lo = full_lo
        seg_hi = full_hi
    if seg == 2:
        seg_lo = full_hi
        seg_hi = hi
    return seg_lo, seg_hi


@triton.jit
def packed_rows(pid_m, kv_head, group, seqlen_q, pitch, shift, BLOCK_M: tl.constexpr, PAD_HEADS: tl.constexpr):
    """-> row_ok, head (query head), offs_i (query index), ip (band index): (BLOCK_M,). Each head owns pitch packed
    rows: seqlen_q, or, PAD_HEADS, seqlen_q rounded up to BLOCK_M, so that no tile holds two heads (a block mask's
    tile then lies in one mask row)."""
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < group * pitch
    r = tl.where(row_ok, offs_r, 0)
    head = kv_head * group + r // pitch
    offs_i = r % pitch
    if PAD_HEADS:
        row_ok = row_ok & (offs_i < seqlen_q)
    return row_ok, head, offs_i, offs_i + shift


@triton.jit
def key_blocks(ip, row_ok, seqlen_k, window_left, window_right, key_lo, key_hi,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks for rows ip within keys [key_lo, key_hi) (key_lo a multiple of BLOCK_N):
    -> (lo, full_lo, full_hi, hi). Blocks in [full_lo, full_hi) need no band or length check; those in
    [lo, full_lo) and [full_hi, hi) do. Blocks wholly outside every row's window are never visited."""
    ip_first = tl.min(tl.where(row_ok, ip, 2147483647), 0)
    ip_last = tl.max(tl.where(row_ok, ip, -2147483647), 0)
    lo = key_lo
    hi = tl.minimum(seqlen_k, key_hi)
    full_lo = lo
    full_hi = tl.minimum(hi, seqlen_k // BLOCK_N * BLOCK_N)
    if HAS_LEFT:
        lo = tl.maximum(lo, tl.maximum(ip_first - window_left, 0) // BLOCK_N * BLOCK_N)
        full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(ip_last - window_left, 0), BLOCK_N) * BLOCK_N)
    if HAS_RIGHT:
        hi = tl.minimum(hi, ip_last + window_right + 1)
        full_hi = tl.minimum(full_hi, tl.maximum(ip_first + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_blocks(key_first, key_last, seqlen_q, shift, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks (of one head) whose window meets keys [key_first, key_last]: -> (lo, full_lo, full_hi, hi),
    as in key_blocks: blocks in [full_lo, full_hi) see every key of the block with no band check."""
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = seqlen_q // BLOCK_M * BLOCK_M
    if HAS_RIGHT:  # key j needs ip >= j - right
        lo = tl.maximum(lo, tl.maximum(key_first - window_right - shift, 0) // BLOCK_M * BLOCK_M)
        full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(key_last - window_right - shift, 0), BLOCK_M) * BLOCK_M)
    if HAS_LEFT:  # key j needs ip <= j + left
        hi = tl.minimum(hi, key_last + window_left - shift + 1)
        full_hi = tl.minimum(full_hi, tl.maximum(key_first + window_left - shift + 1, 0) // BLOCK_M * BLOCK_M)
    lo = tl.maximum(lo, 0)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi
