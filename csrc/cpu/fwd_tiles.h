// The forward's tile math, shared by its paths (fwd_prefill.cpp, fwd_decode.cpp): a task's scratch, the online
// softmax over a key block (softmax_block, attend_block), packing keys and queries as matmul operands, and the
// epilogue (store_rows).
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>

#include "cpu/block_mask.h"
#include "cpu/fwd_plan.h"
#include "cpu/operands.h"
#include "cpu/philox.h"
#include "cpu/tile_math.h"
#include "cpu/vec_math.h"

namespace pyattn::cpu {

// A task's scratch for tiles of up to tile.q rows and tile.k keys.
template <typename T, typename acc>
struct FwdScratch {
  const int64_t bq, bk;  // the tile
  const int64_t ldp;  // ld of the probabilities as an A operand: w.s itself (fp32 tiles), or w.p
  std::unique_ptr<T[]> q;  // (bq, kpad(E)) A operand
  std::unique_ptr<acc[]> s;  // (bq, bk) scores, then probabilities
  std::unique_ptr<T[]> p;  // (bq, kpad(bk)) probabilities as an A operand (bf16 only)
  std::unique_ptr<acc[]> o;  // (bq, Ev) unnormalized output
  std::unique_ptr<acc[]> m, l;  // (bq,) running max (log2 domain) and sum
  std::unique_ptr<uint8_t[]> keep;  // (bk,) dropout
  std::unique_ptr<uint8_t[]> allowed;  // (bq, bk) a partial run's block mask (only with one)
  std::unique_ptr<T[]> kt, v;  // decode: one key block of K^T (kpad(E), bk) and V (kpad(bk), Ev)
  std::unique_ptr<T[]> qt;  // decode: Q^T (kpad(E), bq) as a B operand
  std::unique_ptr<acc[]> st;  // decode: S^T (bk, bq)
  std::unique_ptr<T[]> qt_all;  // paged decode: Q^T of every q head (kpad(E), cols)
  std::unique_ptr<acc[]> st_all;  // paged decode: (bk * Hkv, cols) scores of a key block, all heads
  // decode on rows (attend_block_rows): pointers to a key block's rows of kv head 0 in K and V, and to the next
  // block's in K (3 bk; the cache's element type, which fp32 tiles widen)
  std::unique_ptr<const void*[]> rows;
  FwdScratch(int64_t E, int64_t Ev, bool decode, Tile tile, bool block_mask = false)
      : bq(tile.q), bk(tile.k), ldp(std::is_same_v<T, acc> ? bk : kpad<T>(bk)), q(new T[bq * kpad<T>(E)]),
        s(new acc[bq * bk]), p(std::is_same_v<T, acc> ? nullptr : new T[bq * ldp]), o(new acc[bq * Ev]),
        m(new acc[bq]), l(new acc[bq]), keep(new uint8_t[bk]), allowed(block_mask ? new uint8_t[bq * bk] : nullptr),
        kt(decode ? new T[kpad<T>(E) * bk] : nullptr), v(decode ? new T[kpad<T>(bk) * Ev] : nullptr),
        qt(decode ? new T[kpad<T>(E) * bq] : nullptr), st(decode ? new acc[bk * bq] : nullptr),
        rows(decode ? new const void*[3 * bk] : nullptr) {}
  ~FwdScratch() { matmul_release<T>(); }
  void alloc_all_heads(int64_t E, int64_t Hkv, int64_t cols) {
    if (qt_all) return;
    qt_all.reset(new T[kpad<T>(E) * cols]);
    st_all.reset(new acc[bk * Hkv * cols]);
  }
};

// Rows of a tile: query rows [i0, i0 + n) of each of the q heads [h0, h0 + heads), stacked head by head.
struct Rows {
  int64_t h0, heads, i0, n;
  int64_t size() const { return heads * n; }
};

template <typename acc>
void init_rows(int64_t M, int64_t Ev, acc* o, acc* m, acc* l) {
  std::fill(o, o + M * Ev, acc(0));
  std::fill(m, m + M, neg_inf<acc>());
  std::fill(l, l + M, acc(0));
}

// The raw scores of key block [j0, j0 + nj) in w.s (M, nj; ld w.bk; from row r0) -> online softmax update of
// o (M, Ev), m, l (M,); returns the probabilities as the A operand of P V (ld w.ldp; from row r0 of w.s or w.p).
// allowed: a partial run's block mask (M, nj; ld w.bk; row 0 = the tile's row r0), or null.
template <typename scalar_t, typename T, typename acc>
const T* softmax_block(const AttnParams& p, const Seq& seq, int64_t b, const Rows& rows, int64_t j0, int64_t nj,
                       FwdScratch<T, acc>& w, acc* o, acc* m, acc* l, int64_t r0 = 0,
                       const uint8_t* allowed = nullptr) {
  const int64_t Ev = p.head_dim_v, ldp = w.ldp;
  acc* s0 = w.s.get() + r0 * w.bk;
  T* p0 = std::is_same_v<T, acc> ? nullptr : w.p.get() + r0 * ldp;
  const acc inv_keep = p.dropout_p > 0 ? acc(1 / (1 - p.dropout_p)) : acc(1);
  // bf16/fp16 inputs: a cheaper exp2, and for their bf16 tiles the probabilities written as the A operand directly
  constexpr bool kCheap = !std::is_same_v<scalar_t, acc>;
  for (int64_t g = 0; g < rows.heads; ++g) {
    // per-head score math: ALiBi slope and mask differ per head
    const int64_t h = rows.h0 + g;
    const Scores<scalar_t, acc> sc(p, seq, b, h);
    acc* s = s0 + g * rows.n * w.bk;
    const acc cf = sc.template apply<false>(s, w.bk, rows.i0, rows.n, j0, nj, nullptr);
    if (allowed != nullptr) mask_scores(s, w.bk, allowed + g * rows.n * w.bk, w.bk, rows.n, nj);
    for (int64_t r = g * rows.n; r < (g + 1) * rows.n; ++r) {
      acc* x = s0 + r * w.bk;
      bool in_tile = false;  // the probabilities already written to the A operand
      const acc m_new = nan_max(m[r], row_max(x, nj) * cf);
      if (m_new == neg_inf<acc>()) {
        std::fill(x, x + nj, acc(0));  // nothing allowed so far: p = 0, o and l stay 0
      } else {
        const acc alpha = std::exp2(m[r] - m_new);
        acc sum;
        if constexpr (!std::is_same_v<T, acc>) {
          in_tile = p.dropout_p == 0;
          sum = in_tile ? exp2_row_to<kCheap>(x, p0 + r * ldp, nj, cf, m_new)
                        : exp2_row<kCheap>(x, nj, cf, m_new);
        } else {
          sum = exp2_row<kCheap>(x, nj, cf, m_new);
        }
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
        if (alpha != 1) scale_row(o + r * Ev, Ev, alpha);
        if (p.dropout_p > 0) {
          uint8_t* keep = w.keep.get();
          dropout_keep_row(p.seed, p.offset, b * p.heads_q + h, rows.i0 + r - g * rows.n, j0, nj, p.dropout_p, keep);
          for (int64_t c = 0; c < nj; ++c) x[c] = keep[c] ? x[c] * inv_keep : acc(0);
        }
      }
      if constexpr (!std::is_same_v<T, acc>) {
        T* pr = p0 + r * ldp;
        if (!in_tile) convert_row(x, pr, nj);
        if (kpad<T>(nj) > nj) pr[nj] = T(0);
      }
    }
  }
  if constexpr (std::is_same_v<T, acc>) return s0;
  else return p0;
}

// One key block [j0, j0 + nj) for the tile's rows (q already in w.q): scores, online softmax update of
// o (M, Ev), m, l (M,), then o += P V. kt: K^T block (column 0 = key j0), ld ldk; vb: V from key j0, ld Ev.
// allowed: softmax_block's.
template <typename scalar_t, typename T, typename acc>
void attend_block(const AttnParams& p, const Seq& seq, int64_t b, const Rows& rows, int64_t j0, int64_t nj,
                  const T* kt, int64_t ldk, const T* vb, FwdScratch<T, acc>& w, acc* o, acc* m, acc* l,
                  const uint8_t* allowed = nullptr) {
  const int64_t E = p.head_dim, Ev = p.head_dim_v, M = rows.size();
  matmul(M, nj, E, w.q.get(), kpad<T>(E), kt, ldk, w.s.get(), w.bk, false);
  const T* pa = softmax_block<scalar_t>(p, seq, b, rows, j0, nj, w, o, m, l, 0, allowed);
  matmul(M, Ev, nj, pa, w.ldp, vb, Ev, o, Ev, true);
}

// A partial run's block mask for the tile's rows (w.allowed from row r0: rows.size() rows, ld w.bk); null for a run
// that needs none.
template <typename T, typename acc>
const uint8_t* run_mask(const BlockMask& blocks, const Rows& rows, const Run& run, FwdScratch<T, acc>& w,
                        int64_t r0 = 0) {
  if (!run.partial) return nullptr;
  uint8_t* allowed = w.allowed.get() + r0 * w.bk;
  for (int64_t g = 0; g < rows.heads; ++g)
    blocks.expand(rows.h0 + g, rows.i0, rows.n, run.start, run.n, allowed + g * rows.n * w.bk, w.bk, 1);
  return allowed;
}

// Rows [j, j + n) (cols elements each) into L1 ahead of their use. Always inlined: GCC takes a function of nothing
// but prefetches for one without effects and drops its calls (none was left in the object code).
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_rows(const KeyRows<scalar_t>& rows, int64_t j, int64_t n,
                                                        int64_t cols) {
  for (int64_t i = j; i < j + n; ++i)
    for (int64_t c = 0; c < cols * int64_t(sizeof(scalar_t)); c += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(rows.row(i)) + c, 0, 3);
}

// K^T (kpad(E) rows, ld ldk, column 0 = key j0; skipped when kt is null) and V (rows from key j0, ld Ev) of
// keys [j0, j0 + nj) of kv head hk, as B operands: read run by run, a page at a time when the cache is paged
// (no gather copy).
template <typename scalar_t, typename T>
void pack_keys(const AttnParams& p, const Seq& seq, int64_t b, int64_t hk, int64_t j0, int64_t nj, T* kt,
               int64_t ldk, T* vb) {
  const KeyRows<scalar_t> kr(p, seq, b, p.k, p.k_strides, hk), vr(p, seq, b, p.v, p.v_strides, hk);
  const int64_t E = p.head_dim, Ev = p.head_dim_v, kcol = p.k_strides.col, vcol = p.v_strides.col;
  for (int64_t j = j0, n; kt != nullptr && j < j0 + nj; j += n) {
    n = kr.run(j, j0 + nj - j);
    pack_b(kr.row(j), kcol, kr.row_stride, E, n, kt + b_col<T>(j - j0), ldk);
  }
  if (kVnni<T> && p.block_table != nullptr && (p.page_size % 2 || seq.k0 % 2)) {
    // VNNI pairs consecutive keys, which odd page ends split: pack pair by pair, the second row by its distance
    for (int64_t j = j0; j < j0 + nj; j += 2) {
      const scalar_t* r0 = vr.row(j);
      const int64_t rows = std::min<int64_t>(2, j0 + nj - j);
      pack_b(r0, rows == 2 ? vr.row(j + 1) - r0 : 0, vcol, rows, Ev, vb + (j - j0) * Ev, Ev);
    }
    return;
  }
  for (int64_t j = j0, n; j < j0 + nj; j += n) {
    n = vr.run(j, j0 + nj - j);
    // the next page's rows: the hardware prefetcher does not follow a jump to another page (paged decode 9-12%
    // faster, same measurement as all_heads_scores)
    if (vr.pages != nullptr && j + n < j0 + nj) prefetch_rows(vr, j + n, vr.run(j + n, j0 + nj - j - n), Ev);
    pack_b(vr.row(j), vr.row_stride, vcol, n, Ev, vb + (j - j0) * Ev, Ev);
  }
}

// q rows of the tile -> w.q as the A operand.
template <typename scalar_t, typename T, typename acc>
void load_q(const AttnParams& p, const Seq& seq, const Rows& rows, FwdScratch<T, acc>& w) {
  const auto* q = static_cast<const scalar_t*>(p.q);
  const Strides4 qs = p.q_strides;
  const int64_t Ep = kpad<T>(p.head_dim);
  for (int64_t g = 0; g < rows.heads; ++g)
    pack_a(q + seq.tb * qs.batch + (rows.h0 + g) * qs.head + (seq.q0 + rows.i0) * qs.row, qs.row, qs.col, rows.n,
           p.head_dim, w.q.get() + g * rows.n * Ep);
}

// Epilogue: out = o / l and lse, for the tile's rows; fully masked rows (l == 0) get 0 and -inf. A sink
// joins l (and lse) with no value: such rows get 0 and the sink. o is normalized in place; m, l may change.
template <typename scalar_t, typename acc>
void store_rows(const AttnParams& p, const Seq& seq, const Rows& rows, acc* o, acc* m, acc* l) {
  auto* out = static_cast<scalar_t*>(p.out);
  const Strides4 os = p.out_strides, ls = p.lse_strides;
  const int64_t Ev = p.head_dim_v;
  for (int64_t g = 0; g < rows.heads; ++g) {
    const int64_t h = rows.h0 + g;
    for (int64_t i = 0; i < rows.n; ++i) {
      const int64_t r = g * rows.n + i, row = seq.q0 + rows.i0 + i;
      scalar_t* dst = out + seq.tb * os.batch + h * os.head + row * os.row;
      acc keep = 1;  // what the sink leaves of o's scale
      if (p.sinks != nullptr) {
        const acc sink = acc(sink_logit(p, h) * kLog2e), m_new = nan_max(m[r], sink);
        keep = std::exp2(m[r] - m_new);
        l[r] = l[r] * keep + std::exp2(sink - m_new);
        m[r] = m_new;
      }
      // l is 0 for a fully masked row (-> 0, -inf), NaN for a row that met a NaN (-> NaN, NaN)
      const acc inv = l[r] == 0 ? acc(0) : keep / l[r];
      acc* o_r = o + r * Ev;
      if (os.col == 1) {
        scale_row(o_r, Ev, inv);
        convert_row(o_r, dst, Ev);
      } else {
        for (int64_t c = 0; c < Ev; ++c) dst[c * os.col] = static_cast<scalar_t>(o_r[c] * inv);
      }
      p.lse[seq.tb * ls.batch + h * ls.head + row * ls.row] =
          l[r] == 0 ? neg_inf<float>() : float(m[r] * acc(kLn2) + std::log(l[r]));
    }
  }
}

}  // namespace pyattn::cpu
