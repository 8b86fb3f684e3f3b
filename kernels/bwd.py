"""Backward: delta = rowsum(dO * O) prepass, then a dK/dV kernel (one program per key block, looping over the
query blocks that see it) and a dQ kernel (one program per packed row block, looping over key blocks).
Each output element is written by exactly one program: no atomics, deterministic.

Scores are recomputed exactly as the forward computed them (scores.py); P = exp2(s2 - lse2).
"""
import triton
import triton.language as tl

from .chunks import chunked_dot, load_chunk
from .block_mask import BLOCK_MASK_NONE, BLOCK_MASK_TILES, block_masked, span, span_run, visits
from .scores import LOG2E, band_and_bounds, biased, capped, dropout_keep, row_terms
from .tiles import key_blocks, query_blocks, row_block, segment, seq_span


@triton.jit
def _attn_bwd_preprocess(Out, DOut, DLse, Delta,
                         stride_ob, stride_oh, stride_om, stride_od,  # out (B, Hq, L, Ev)
                         stride_db, stride_dh, stride_dm, stride_dd,  # dout (B, Hq, L, Ev)
                         stride_lb, stride_lh, stride_lm,  # dlse (B, Hq, L) float32
                         H_Q, seqlen_q, head_dim_v,
                         BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta (B, Hq, L) = rowsum(dO * O) - dLSE: with an lse gradient, dS = P * (dP - delta) still holds."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(1) // H_Q
    h = tl.program_id(1) % H_Q
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_ok = offs_m < seqlen_q
    ok = m_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b.to(tl.int64) * stride_db + h * stride_dh + rows * stride_dm
                 + offs_dv[None, :] * stride_dd, mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m * stride_lm, mask=m_ok,
                         other=0.0)
    tl.store(Delta + (b * H_Q + h).to(tl.int64) * seqlen_q + offs_m, delta, mask=m_ok)


@triton.jit
def _query_rows(Q, DOut, Lse, Delta, b64, head, rows, row_ok, stride_qb, stride_qh, stride_qm, stride_qd,
                stride_db, stride_dh, stride_dm, stride_dd, stride_lb, stride_lh, head_dim, head_dim_v,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """q, dO, lse (log2 units, +inf where the row saw no key) and delta of rows (head, rows)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    head64 = head.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + head64[:, None] * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    do = tl.load(DOut + b64 * stride_db + head64[:, None] * stride_dh + rows[:, None] * stride_dm
                 + offs_dv[None, :] * stride_dd, mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    lse2, delta = _row_stats(Lse, Delta, b64, head, rows, row_ok, stride_lb, stride_lh)
    return q, do, lse2, delta


@triton.jit
def _row_stats(Lse, Delta, b64, head, rows, row_ok, stride_lb, stride_lh):
    """lse (log2 units, +inf where the row saw no key) and delta of rows (head, rows)."""
    stat_rows = b64 * stride_lb + head.to(tl.int64) * stride_lh + rows
    lse = tl.load(Lse + stat_rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + stat_rows, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), delta


@triton.jit
def _probs_and_dscore(qk, dp, lse2_2, delta2, ip2, n2, ok2, mask_rows2, stride_mn, slopes2, seed, rng2, seqlen_k,
                      scale, softcap, window_left, window_right, dropout_p,
                      Bits, state_rows2, state, i2, r0, c0, block_q, block_k, bits_row, stride_stq, stride_stk,
                      banded, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                      DROPOUT: tl.constexpr, BLOCK_MASK: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """One tile from q.k and dO.v (either orientation, see scores.py): -> (P as the forward used it, after
    dropout; dS w.r.t. the biased score; dS w.r.t. q.k). lse2_2 is +inf for queries that saw no key, so
    their P is 0. banded: check the band per element (a constexpr, or a block mask's runtime flag). i2: the query
    indices (ip2 is shifted); the block-mask arguments as in block_mask.block_masked."""
    s_cap = capped(qk, scale, softcap, HAS_SOFTCAP)
    s = biased(s_cap, ip2, n2, ok2, mask_rows2, stride_mn, slopes2, seqlen_k, MASK_KIND, HAS_ALIBI)
    if banded:
        s = tl.where(band_and_bounds(ip2, n2, ok2, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                     s, float("-inf"))
    if BLOCK_MASK != BLOCK_MASK_NONE:
        s = block_masked(s, Bits, state_rows2, state, i2, n2, r0, c0, ok2, seqlen_k, block_q, block_k, bits_row,
                         stride_stq, stride_stk, BLOCK_MASK, KEYS_FIRST)
    p = tl.exp2(s - lse2_2)
    p_used = p
    if DROPOUT:  # O = (P * keep / (1 - p)) V, so dP = dP_used * keep / (1 - p)
        keep = dropout_keep(seed, rng2 + n2, dropout_p)
        p_used = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta2)
    if HAS_SOFTCAP:  # d softcap(u)/du = 1 - tanh^2
        t = s_cap * (1.0 / (softcap * LOG2E))
        ds_qk = ds * (scale * (1.0 - t * t))
    else:
        ds_qk = ds * scale
    return p_used, ds, ds_qk


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DOut, Lse, Delta, DK, DV, Mask, Alibi, CuSeqQ, CuSeqK, Rng,
                   States, Bits, Lists,  # block mask as in the forward; lists (Bm, Hm, Kb, 1 + Qb): per mask column
                   stride_qb, stride_qh, stride_qm, stride_qd,  # q (B, Hq, L, E)
                   stride_kb, stride_kh, stride_kn, stride_kd,  # k (B, Hkv, S, E)
                   stride_vb, stride_vh, stride_vn, stride_vd,  # v (B, Hkv, S, Ev)
                   stride_db, stride_dh, stride_dm, stride_dd,  # dout (B, Hq, L, Ev)
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # dk like k
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # dv like v
                   stride_mb, stride_mh, stride_mm, stride_mn,  # mask (B, Hq, L, S)
                   stride_ab, stride_ah,  # alibi slopes (B, Hq)
                   stride_lb, stride_lh,  # lse, delta (B, Hq, L) float32, contiguous
                   stride_stb, stride_sth, stride_stq, stride_stk, stride_lib, stride_lih, stride_lir,  # block mask
                   block_q, block_k, bits_row,
                   H_Q, H_KV, seqlen_q, seqlen_k, head_dim, head_dim_v,
                   scale, softcap, window_left, window_right, bottom_right, dropout_p, seq_bucket,  # (autotune key)
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   VARLEN: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_MASK: tl.constexpr, CHUNKED: tl.constexpr, K_CHUNK: tl.constexpr,
                   OUT_CHUNK: tl.constexpr, OUT_DV: tl.constexpr):
    """CHUNKED (head dims in chunks, configs.py): this launch writes dV (OUT_DV) or dK, program_id(2) picking its
    OUT_CHUNK columns; the scores are accumulated over head-dim chunks."""
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // H_KV
    kv_head = tl.program_id(1) % H_KV
    group = H_Q // H_KV
    q_start, len_q = seq_span(CuSeqQ, b, seqlen_q, VARLEN)
    k_start, len_k = seq_span(CuSeqK, b, seqlen_k, VARLEN)
    if start_n >= len_k:
        return
    shift = (len_k - len_q) * bottom_right
    b64 = tl.full([], 0 if VARLEN else b, tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM)  # (chunked: unused)
    offs_dv = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM_V)
    n_ok = offs_n < len_k
    key_rows = (k_start + offs_n).to(tl.int64)
    k_rows = K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + key_rows * stride_kn
    v_rows = V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + key_rows * stride_vn
    if CHUNKED:
        offs_out = tl.program_id(2) * OUT_CHUNK + tl.arange(0, OUT_CHUNK)
        acc = tl.zeros([BLOCK_N, OUT_CHUNK], tl.float32)

    if not CHUNKED:
        # load k, v: they stay in SRAM while every query block that sees them streams by
        k = tl.load(K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + key_rows[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=n_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        v = tl.load(V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + key_rows[:, None] * stride_vn
                    + offs_dv[None, :] * stride_vd, mask=n_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_V], tl.float32)
    key_last = tl.minimum(start_n + BLOCK_N, len_k) - 1
    lo, full_lo, full_hi, hi = query_blocks(start_n, key_last, len_q, shift, window_left, window_right,
                                            HAS_LEFT, HAS_RIGHT, BLOCK_M)
    # block mask: TILES visits the q blocks of this key block's mask column (list per query head), GATHER reads each
    # element's state; without TILES one span, all queries (a loop of one trip, folded away)
    kb = start_n // block_k
    k0 = kb * block_k
    for g in range(0, group):
        head = tl.zeros([BLOCK_M], tl.int32) + kv_head * group + g
        state_rows = States + b.to(tl.int64) * stride_stb + head.to(tl.int64) * stride_sth
        num_spans = 1
        state = 1
        q0 = 0
        if BLOCK_MASK == BLOCK_MASK_TILES:
            num_spans, list_row, state_row = visits(Lists, States, b, kv_head * group + g, kb, stride_lib,
                                                    stride_lih, stride_lir, stride_stb, stride_sth)
        for j in range(0, num_spans):
            if BLOCK_MASK == BLOCK_MASK_TILES:
                state, q0 = span(list_row, j, state_row, kb, stride_stk, stride_stq, block_q)
            for seg in tl.static_range(1 if BLOCK_MASK == BLOCK_MASK_TILES else 3):
                seg_lo, seg_hi = segment(seg, lo, full_lo, full_hi, hi)
                banded = seg != 1
                if BLOCK_MASK == BLOCK_MASK_TILES:
                    seg_lo, seg_hi, banded = span_run(lo, full_lo, full_hi, hi, q0, block_q)
                for start_m in range(seg_lo, seg_hi, BLOCK_M):
                    offs_i = start_m + tl.arange(0, BLOCK_M)
                    row_ok = offs_i < len_q
                    rows = (q_start + offs_i).to(tl.int64)
                    if CHUNKED:
                        q_rows = Q + b64 * stride_qb + head.to(tl.int64) * stride_qh + rows * stride_qm
                        do_rows = DOut + b64 * stride_db + head.to(tl.int64) * stride_dh + rows * stride_dm
                        lse2, delta = _row_stats(Lse, Delta, b64, head, rows, row_ok, stride_lb, stride_lh)
                    else:
                        q, do, lse2, delta = _query_rows(
                            Q, DOut, Lse, Delta, b64, head, rows, row_ok, stride_qb, stride_qh, stride_qm,
                            stride_qd, stride_db, stride_dh, stride_dm, stride_dd, stride_lb, stride_lh, head_dim,
                            head_dim_v, HEAD_DIM, HEAD_DIM_V)
                    mask_rows, slopes, seed, rng_rows = row_terms(
                        Mask, Alibi, Rng, b, b64, head, offs_i, row_ok, H_Q, seqlen_q, seqlen_k, stride_mb,
                        stride_mh, stride_mm, stride_ab, stride_ah, HAS_ALIBI, DROPOUT, BLOCK_M)
                    # transposed tiles (keys, queries): dV and dK take P^T and dS^T straight from registers
                    if CHUNKED:  # dV's chunks need no dP
                        qk_t = chunked_dot(k_rows, n_ok, stride_kd, q_rows, row_ok, stride_qd, head_dim, HEAD_DIM,
                                           K_CHUNK, DOT_PRECISION)
                        dp_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                        if not OUT_DV:
                            dp_t = chunked_dot(v_rows, n_ok, stride_vd, do_rows, row_ok, stride_dd, head_dim_v,
                                               HEAD_DIM_V, K_CHUNK, DOT_PRECISION)
                    else:
                        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
                        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                    p_t, _, ds_qk_t = _probs_and_dscore(
                        qk_t, dp_t, lse2[None, :], delta[None, :], (offs_i + shift)[None, :], offs_n[:, None],
                        row_ok[None, :], mask_rows[None, :], stride_mn, slopes[None, :], seed, rng_rows[None, :],
                        len_k, scale, softcap, window_left, window_right, dropout_p, Bits, state_rows[None, :],
                        state, offs_i[None, :], start_m - q0, start_n - k0, block_q, block_k, bits_row, stride_stq,
                        stride_stk, banded, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT,
                        BLOCK_MASK, True)
                    if CHUNKED:
                        if OUT_DV:
                            do_c = load_chunk(do_rows, row_ok, stride_dd, offs_out, head_dim_v)
                            acc = tl.dot(p_t.to(do_c.dtype), do_c, acc, input_precision=DOT_PRECISION)
                        else:
                            q_c = load_chunk(q_rows, row_ok, stride_qd, offs_out, head_dim)
                            acc = tl.dot(ds_qk_t.to(q_c.dtype), q_c, acc, input_precision=DOT_PRECISION)
                    else:
                        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
                        dk = tl.dot(ds_qk_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    if CHUNKED:
        if OUT_DV:
            tl.store(DV + b64 * stride_dvb + kv_head.to(tl.int64) * stride_dvh + key_rows[:, None] * stride_dvn
                     + offs_out[None, :] * stride_dvd, acc.to(DV.dtype.element_ty),
                     mask=n_ok[:, None] & (offs_out[None, :] < head_dim_v))
        else:
            tl.store(DK + b64 * stride_dkb + kv_head.to(tl.int64) * stride_dkh + key_rows[:, None] * stride_dkn
                     + offs_out[None, :] * stride_dkd, acc.to(DK.dtype.element_ty),
                     mask=n_ok[:, None] & (offs_out[None, :] < head_dim))
    else:
        tl.store(DK + b64 * stride_dkb + kv_head.to(tl.int64) * stride_dkh + key_rows[:, None] * stride_dkn
                 + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_d[None, :] < head_dim))
        tl.store(DV + b64 * stride_dvb + kv_head.to(tl.int64) * stride_dvh + key_rows[:, None] * stride_dvn
                 + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _attn_bwd_dq(Q, K, V, DOut, Lse, Delta, DQ, DMask, Mask, Alibi, CuSeqQ, CuSeqK, Rng,
                 States, Bits, Lists,  # block mask as in the forward
                 stride_qb, stride_qh, stride_qm, stride_qd,  # q (B, Hq, L, E)
                 stride_kb, stride_kh, stride_kn, stride_kd,  # k (B, Hkv, S, E)
                 stride_vb, stride_vh, stride_vn, stride_vd,  # v (B, Hkv, S, Ev)
                 stride_db, stride_dh, stride_dm, stride_dd,  # dout (B, Hq, L, Ev)
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # dq like q
                 stride_mb, stride_mh, stride_mm, stride_mn,  # mask (B, Hq, L, S)
                 stride_ab, stride_ah,  # alibi slopes (B, Hq)
                 stride_lb, stride_lh,  # lse, delta (B, Hq, L) float32, contiguous
                 stride_stb, stride_sth, stride_stq, stride_stk, stride_lib, stride_lih, stride_lir,  # block mask
                 block_q, block_k, bits_row,
                 H_Q, H_KV, seqlen_q, seqlen_k, head_dim, head_dim_v,  # dmask: (B, Hq, L, S) contiguous
                 scale, softcap, window_left, window_right, bottom_right, dropout_p, seq_bucket,  # (autotune key)
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 VARLEN: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASK_GRAD: tl.constexpr, BLOCK_MASK: tl.constexpr, CHUNKED: tl.constexpr, K_CHUNK: tl.constexpr,
                 OUT_CHUNK: tl.constexpr):
    """CHUNKED (head dims in chunks, configs.py): program_id(2) picks the OUT_CHUNK columns of dQ this program
    writes; the scores are accumulated over head-dim chunks."""
    pid_m = tl.program_id(0)
    b, kv_head, group, q_start, len_q, k_start, len_k, row_ok, head, offs_i, ip, pitch = row_block(
        pid_m, tl.program_id(1), H_Q, H_KV, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, bottom_right, VARLEN, BLOCK_M,
        BLOCK_MASK == BLOCK_MASK_TILES)
    if pid_m * BLOCK_M >= group * pitch:
        return
    b64 = tl.full([], 0 if VARLEN else b, tl.int64)
    head64 = head.to(tl.int64)
    rows = (q_start + offs_i).to(tl.int64)
    offs_d = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM)  # (chunked: unused)
    offs_dv = tl.arange(0, K_CHUNK if CHUNKED else HEAD_DIM_V)

    if CHUNKED:  # q, dO read chunk by chunk in the key loop
        q_rows = Q + b64 * stride_qb + head64 * stride_qh + rows * stride_qm
        do_rows = DOut + b64 * stride_db + head64 * stride_dh + rows * stride_dm
        lse2, delta = _row_stats(Lse, Delta, b64, head, rows, row_ok, stride_lb, stride_lh)
        offs_out = tl.program_id(2) * OUT_CHUNK + tl.arange(0, OUT_CHUNK)
        dq = tl.zeros([BLOCK_M, OUT_CHUNK], tl.float32)
    else:  # load q, dO, lse, delta: they stay in SRAM while the key blocks stream by
        q, do, lse2, delta = _query_rows(Q, DOut, Lse, Delta, b64, head, rows, row_ok, stride_qb, stride_qh,
                                         stride_qm, stride_qd, stride_db, stride_dh, stride_dm, stride_dd, stride_lb,
                                         stride_lh, head_dim, head_dim_v, HEAD_DIM, HEAD_DIM_V)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    mask_rows, slopes, seed, rng_rows = row_terms(Mask, Alibi, Rng, b, b64, head, offs_i, row_ok, H_Q, seqlen_q,
                                                  seqlen_k, stride_mb, stride_mh, stride_mm, stride_ab, stride_ah,
                                                  HAS_ALIBI, DROPOUT, BLOCK_M)
    dmask_rows = DMask + ((b64 * H_Q + head64) * seqlen_q + offs_i) * seqlen_k
    k_base = K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh

    lo, full_lo, full_hi, hi = key_blocks(ip, row_ok, len_k, window_left, window_right, 0, len_k,
                                          HAS_LEFT, HAS_RIGHT, BLOCK_N)
    # block mask: as in the forward (its TILES walk the tile's mask row)
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
        for seg in tl.static_range(1 if BLOCK_MASK == BLOCK_MASK_TILES else 3):
            seg_lo, seg_hi = segment(seg, lo, full_lo, full_hi, hi)
            banded = seg != 1
            if BLOCK_MASK == BLOCK_MASK_TILES:
                seg_lo, seg_hi, banded = span_run(lo, full_lo, full_hi, hi, k0, block_k)
            for start_n in range(seg_lo, seg_hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < len_k
                key_rows = (k_start + offs_n).to(tl.int64)
                if CHUNKED:
                    k_rows = k_base + key_rows * stride_kn
                    qk = chunked_dot(q_rows, row_ok, stride_qd, k_rows, n_ok, stride_kd, head_dim, HEAD_DIM, K_CHUNK,
                                     DOT_PRECISION)
                    dp = chunked_dot(do_rows, row_ok, stride_dd, v_base + key_rows * stride_vn, n_ok, stride_vd,
                                     head_dim_v, HEAD_DIM_V, K_CHUNK, DOT_PRECISION)
                    k = load_chunk(k_rows, n_ok, stride_kd, offs_out, head_dim)
                else:
                    k = tl.load(k_base + key_rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                                mask=n_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
                    v = tl.load(v_base + key_rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                                mask=n_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
                    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                _, ds, ds_qk = _probs_and_dscore(
                    qk, dp, lse2[:, None], delta[:, None], ip[:, None], offs_n[None, :], row_ok[:, None],
                    mask_rows[:, None], stride_mn, slopes[:, None], seed, rng_rows[:, None], len_k, scale, softcap,
                    window_left, window_right, dropout_p, Bits, state_rows[:, None], state, offs_i[:, None], r0,
                    start_n - k0, block_q, block_k, bits_row, stride_stq, stride_stk, banded, MASK_KIND, HAS_ALIBI,
                    HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT, DROPOUT, BLOCK_MASK, False)
                dq = tl.dot(ds_qk.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
                if MASK_GRAD:  # d out / d (float mask) is dS itself (written once: by the first dQ chunk)
                    dmask_ok = row_ok[:, None] & n_ok[None, :]
                    if CHUNKED:
                        dmask_ok = dmask_ok & (tl.program_id(2) == 0)
                    tl.store(dmask_rows[:, None] + offs_n[None, :], ds, mask=dmask_ok)

    if CHUNKED:
        tl.store(DQ + b64 * stride_dqb + head64[:, None] * stride_dqh + rows[:, None] * stride_dqm
                 + offs_out[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_out[None, :] < head_dim))
    else:
        tl.store(DQ + b64 * stride_dqb + head64[:, None] * stride_dqh + rows[:, None] * stride_dqm
                 + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
