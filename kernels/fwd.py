"""Forward: online softmax in the exp2 domain over the key blocks a row block can see, LSE out.

One program = BLOCK_M packed rows (GQA heads sharing K/V, see tiles.py) x one split of the keys. With
NUM_SPLITS > 1 (decoding: few rows, many keys) each split writes a partial (out, lse) and _attn_fwd_combine
merges them. Sinks (HAS_SINKS) join each row's softmax denominator once: in the epilogue, or in the combine.

KV_CACHE: K/V are caches and sequence b reads keys [leftpad[b], seqlens_k[b]) of cache row CacheIdx[b] (or b),
or, PAGED, of the pages block_table[b, :] (K/V (num_pages, Hkv, page_size, E) by their strides); its queries are
bottom-right aligned to its own key count.
"""
import triton
import triton.language as tl

from .chunks import chunked_dot, load_chunk
from .block_mask import BLOCK_MASK_NONE, BLOCK_MASK_TILES, block_masked, span, span_run, visits
from .scores import LOG2E, band_and_bounds, biased, capped, dropout_keep, row_terms
from .tiles import cache_span, key_blocks, key_rows, row_block, segment


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, k_desc, v_desc, k_base, v_base, Pages, k_start, page_size,
               stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, lo, hi,
               ip, row_ok, mask_rows, stride_mn, slopes, seed, rng_rows, seqlen_k, head_dim, head_dim_v,
               scale, softcap, window_left, window_right, dropout_p,
               Bits, state_rows, state, offs_i, r0, k0, block_q, block_k, bits_row, stride_stq, stride_stk,
               banded, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
               DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PAGED: tl.constexpr,
               BLOCK_MASK: tl.constexpr, q_rows, stride_qd, out0, CHUNKED: tl.constexpr, K_CHUNK: tl.constexpr,
               OUT_CHUNK: tl.constexpr):
    """Key blocks [lo, hi): banded ones (a constexpr, or a block mask's runtime flag) check the window and the key
    length per element; a block mask's (TILES: these blocks lie in the mask block of state `state` whose first key is
    k0, the tile's rows from its row r0), see block_mask.py. CHUNKED (head dims above 256, configs.py): the scores
    are accumulated over head-dim chunks of q's rows (pointers q_rows) and acc holds output columns
    [out0, out0 + OUT_CHUNK)."""
    offs_d = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM)  # (chunked: unused)
    offs_dv = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM_V)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # load k, v: TMA zero-fills past the sequence; pointer loads mask it
        if USE_TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        elif CHUNKED:
            n_ok = offs_n < seqlen_k
            k_rows, v_rows = key_rows(offs_n, n_ok, Pages, k_start, page_size, stride_kb, stride_kn, stride_vb,
                                      stride_vn, PAGED)
            v = load_chunk(V + v_base + v_rows, n_ok, stride_vd, out0 + tl.arange(0, OUT_CHUNK), head_dim_v)
        else:
            n_ok = offs_n < seqlen_k
            k_rows, v_rows = key_rows(offs_n, n_ok, Pages, k_start, page_size, stride_kb, stride_kn, stride_vb,
                                      stride_vn, PAGED)
            k = tl.load(K + k_base + k_rows[:, None] + offs_d[None, :] * stride_kd,
                        mask=n_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
            v = tl.load(V + v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd,
                        mask=n_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        if CHUNKED:
            qk = chunked_dot(q_rows, row_ok, stride_qd, K + k_base + k_rows, n_ok, stride_kd, head_dim, HEAD_DIM,
                             K_CHUNK, DOT_PRECISION)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = capped(qk, scale, softcap, HAS_SOFTCAP)
        s = biased(s, ip[:, None], offs_n[None, :], row_ok[:, None], mask_rows[:, None], stride_mn,
                   slopes[:, None], seqlen_k, MASK_KIND, HAS_ALIBI)
        if banded:
            s = tl.where(band_and_bounds(ip[:, None], offs_n[None, :], row_ok[:, None], seqlen_k, window_left,
                                         window_right, HAS_LEFT, HAS_RIGHT), s, float("-inf"))
        if BLOCK_MASK != BLOCK_MASK_NONE:
            s = block_masked(s, Bits, state_rows[:, None], state, offs_i[:, None],
                             offs_n[None, :], r0, start_n - k0, row_ok[:, None], seqlen_k, block_q, block_k,
                             bits_row, stride_stq, stride_stk, BLOCK_MASK, False)
        # online softmax; a row with nothing visible yet keeps m = -inf, so subtract a safe 0 instead. NaN needs no
        # care: a NaN score's p is NaN whatever max was kept (GPU max drops NaN), so l_i, acc and lse turn NaN
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # softmax first, then drop: l_i keeps every weight
            p = tl.where(dropout_keep(seed, rng_rows[:, None] + offs_n[None, :], dropout_p), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Mask, Alibi, CuSeqQ, CuSeqK, Rng, Sinks, BlockTable, CacheIdx, Leftpad,
              States, Bits, Lists,  # block mask: states (Bm, Hm, Qb, Kb) int32, bits (P, block_q, bits_row) uint8,
              # lists (Bm, Hm, Qb, 1 + Kb) int32: per mask row its count of non-empty key blocks, then them
              stride_qb, stride_qh, stride_qm, stride_qd,  # q (B, Hq, L, E)
              stride_kb, stride_kh, stride_kn, stride_kd,  # k (B, Hkv, S, E); KV_CACHE: (B_cache or pages, Hkv, ., E)
              stride_vb, stride_vh, stride_vn, stride_vd,  # v (B, Hkv, S, Ev)
              stride_os, stride_ob, stride_oh, stride_om, stride_od,  # out (splits, B, Hq, L, Ev)
              stride_ls, stride_lb, stride_lh, stride_lm,  # lse (splits, B, Hq, L) float32
              stride_mb, stride_mh, stride_mm, stride_mn,  # mask (B, Hq, L, S), stride 0 where broadcast
              stride_ab, stride_ah,  # alibi slopes (B, Hq) float32
              stride_bt, page_size,  # block_table (B, max_pages) int32; KV_CACHE: CuSeqK holds seqlens_k (B,)
              stride_stb, stride_sth, stride_stq, stride_stk, stride_lib, stride_lih, stride_lir,  # 0 where broadcast
              block_q, block_k, bits_row,
              H_Q, H_KV, seqlen_q, seqlen_k, head_dim, head_dim_v,
              scale, softcap, window_left, window_right, bottom_right, dropout_p, seq_bucket,  # (autotune key)
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
              NUM_SPLITS: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
              WARP_SPECIALIZE: tl.constexpr, HAS_SINKS: tl.constexpr, KV_CACHE: tl.constexpr,
              PAGED: tl.constexpr, HAS_CACHE_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
              BLOCK_MASK: tl.constexpr, CHUNKED: tl.constexpr, K_CHUNK: tl.constexpr,
              OUT_CHUNK: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    out0 = 0
    if CHUNKED:  # head dims in chunks (configs.py): program_id(1) also picks this program's OUT_CHUNK output columns
        out0 = split // NUM_SPLITS * OUT_CHUNK
        split = split % NUM_SPLITS
    b, kv_head, group, q_start, len_q, k_start, len_k, row_ok, head, offs_i, ip, pitch = row_block(
        pid_m, tl.program_id(2), H_Q, H_KV, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, bottom_right, VARLEN, BLOCK_M,
        BLOCK_MASK == BLOCK_MASK_TILES)
    if KV_CACHE:  # this sequence's keys, and its queries aligned to their end
        k_start, len_k = cache_span(CuSeqK, Leftpad, b, HAS_LEFTPAD)
        ip = offs_i + (len_k - len_q)
    if pid_m * BLOCK_M >= group * pitch:
        return
    b_ptr = 0 if VARLEN else b  # varlen tensors are one packed batch
    b64 = tl.full([], b_ptr, tl.int64)
    head64 = head.to(tl.int64)
    row64 = (q_start + offs_i).to(tl.int64)
    offs_d = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM)  # (chunked: unused)
    offs_dv = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM_V)
    q_rows = Q + b64 * stride_qb + head64 * stride_qh + row64 * stride_qm
    if CHUNKED:  # q is read chunk by chunk in the key loop; acc holds output columns [out0, out0 + OUT_CHUNK)
        offs_dv = out0 + tl.arange(0, OUT_CHUNK)
        q = q_rows
    else:  # load q: it stays in SRAM for the whole key loop
        q = tl.load(Q + b64 * stride_qb + head64[:, None] * stride_qh + row64[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    mask_rows, slopes, seed, rng_rows = row_terms(Mask, Alibi, Rng, b, b64, head, offs_i, row_ok, H_Q, seqlen_q,
                                                  seqlen_k, stride_mb, stride_mh, stride_mm, stride_ab, stride_ah,
                                                  HAS_ALIBI, DROPOUT, BLOCK_M)

    # K/V of this sequence and kv head: paged keys add their page and row per key (key_rows)
    kv_row = b64
    if HAS_CACHE_IDX:
        kv_row = tl.load(CacheIdx + b).to(tl.int64)
    k_base = kv_row * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = kv_row * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    if PAGED:
        k_base = kv_head.to(tl.int64) * stride_kh
        v_base = kv_head.to(tl.int64) * stride_vh
    pages = BlockTable + b64 * stride_bt
    k_desc = None
    v_desc = None
    if USE_TMA:  # zero-filled past len_k and head_dim, so no load masks
        k_desc = tl.make_tensor_descriptor(K + k_base, shape=[len_k, head_dim], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(V + v_base, shape=[len_k, head_dim_v], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_V])

    # this split's keys, cut to the blocks some row can see
    split_len = tl.cdiv(tl.cdiv(len_k, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo, full_lo, full_hi, hi = key_blocks(ip, row_ok, len_k, window_left, window_right, split * split_len,
                                          (split + 1) * split_len, HAS_LEFT, HAS_RIGHT, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, OUT_CHUNK if CHUNKED else HEAD_DIM_V], tl.float32)
    # block mask: GATHER reads each element's state through its row's states; TILES visits the non-empty key blocks of
    # the tile's mask row (one head, one q block qb: see block_mask.py), each a span of keys of one state. Without
    # TILES one span, all keys (a loop of one trip, folded away)
    state_rows = States + b.to(tl.int64) * stride_stb + head.to(tl.int64) * stride_sth
    num_spans = 1
    state = 1
    r0 = 0
    k0 = 0
    if BLOCK_MASK == BLOCK_MASK_TILES:
        qb = (pid_m * BLOCK_M % pitch) // block_q
        r0 = pid_m * BLOCK_M % pitch - qb * block_q
        num_spans, list_row, state_row = visits(Lists, States, b, kv_head * group + pid_m * BLOCK_M // pitch, qb,
                                                stride_lib, stride_lih, stride_lir, stride_stb, stride_sth)
    for j in range(0, num_spans):
        if BLOCK_MASK == BLOCK_MASK_TILES:
            state, k0 = span(list_row, j, state_row, qb, stride_stq, stride_stk, block_k)
        # three runs of key blocks: band edge, interior (no per-element checks), band edge / sequence end; a block
        # mask's span is one run
        for seg in tl.static_range(1 if BLOCK_MASK == BLOCK_MASK_TILES else 3):
            seg_lo, seg_hi = segment(seg, lo, full_lo, full_hi, hi)
            banded = seg != 1
            if BLOCK_MASK == BLOCK_MASK_TILES:
                seg_lo, seg_hi, banded = span_run(lo, full_lo, full_hi, hi, k0, block_k)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_desc, v_desc, k_base, v_base, pages, k_start,
                                       page_size, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd,
                                       seg_lo, seg_hi, ip, row_ok, mask_rows, stride_mn, slopes, seed, rng_rows, len_k,
                                       head_dim, head_dim_v, scale, softcap, window_left, window_right, dropout_p,
                                       Bits, state_rows, state, offs_i, r0, k0, block_q, block_k, bits_row,
                                       stride_stq, stride_stk, banded, BLOCK_N, HEAD_DIM, HEAD_DIM_V, MASK_KIND,
                                       HAS_ALIBI, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT, USE_TMA, DOT_PRECISION,
                                       WARP_SPECIALIZE and seg == 1, PAGED, BLOCK_MASK, q_rows, stride_qd, out0,
                                       CHUNKED, K_CHUNK, OUT_CHUNK)

    if HAS_SINKS and NUM_SPLITS == 1:  # the sink's exp joins the denominator (no value); split-KV: the combine
        sink = tl.load(Sinks + head, mask=row_ok, other=float("-inf")) * LOG2E
        m_new = tl.maximum(m_i, sink)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    # rows that saw no key (and no sink): out 0, lse -inf (torch gives 0 for fully masked rows)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_rows = split.to(tl.int64) * stride_os + b64 * stride_ob + head64 * stride_oh + row64 * stride_om
    tl.store(Out + o_rows[:, None] + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    l_rows = split.to(tl.int64) * stride_ls + b64 * stride_lb + head64 * stride_lh + row64 * stride_lm
    tl.store(Lse + l_rows, lse, mask=row_ok)


@triton.jit
def _attn_fwd_combine(OutPart, LsePart, Out, Lse, Sinks, num_rows, num_splits, H_Q, seqlen_q, head_dim_v,
                      stride_ps, stride_pr, stride_pd,  # partial out (splits, rows, Ev) float32, rows (B, Hq, L)
                      stride_qs, stride_qr,  # partial lse (splits, rows) float32
                      stride_ob, stride_oh, stride_om, stride_od,  # out (B, Hq, L, Ev), any strides
                      stride_lb, stride_lh, stride_lm,  # lse (B, Hq, L) float32
                      BLOCK_R: tl.constexpr, HEAD_DIM_V: tl.constexpr, SPLITS: tl.constexpr,
                      HAS_SINKS: tl.constexpr):
    """Merges per-split (out, lse) of split-KV decoding: out = sum_s exp(lse_s - lse) out_s, where lse also counts
    the row's sink (once, here: the splits leave it out)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, SPLITS)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    r_ok = offs_r < num_rows
    r = tl.where(r_ok, offs_r, 0)
    b = (r // (H_Q * seqlen_q)).to(tl.int64)
    head = (r // seqlen_q) % H_Q
    i = (r % seqlen_q).to(tl.int64)
    lse_s = tl.load(LsePart + offs_s[:, None] * stride_qs + offs_r.to(tl.int64)[None, :] * stride_qr,
                    mask=(offs_s[:, None] < num_splits) & r_ok[None, :], other=float("-inf"))
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + head, mask=r_ok, other=float("-inf"))
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe[None, :])  # (SPLITS, BLOCK_R)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    empty = total == 0.0
    w_sum = tl.where(empty, 1.0, total)
    w = w / w_sum[None, :]
    acc = tl.zeros([BLOCK_R, HEAD_DIM_V], tl.float32)
    for s in range(0, num_splits):
        part = tl.load(OutPart + s * stride_ps + offs_r.to(tl.int64)[:, None] * stride_pr
                       + offs_dv[None, :] * stride_pd, mask=r_ok[:, None] & (offs_dv[None, :] < head_dim_v),
                       other=0.0)
        w_s = tl.sum(tl.where(offs_s[:, None] == s, w, 0.0), 0)
        acc += part * w_s[:, None]
    o_rows = b * stride_ob + head.to(tl.int64) * stride_oh + i * stride_om
    tl.store(Out + o_rows[:, None] + offs_dv[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=r_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(Lse + b * stride_lb + head.to(tl.int64) * stride_lh + i * stride_lm,
             tl.where(empty, float("-inf"), m_safe + tl.log(w_sum)), mask=r_ok)
