// Score math shared by forward and backward: which keys a query may see (window / causal / varlen
// bounds), and the raw q.k tile -> log2-domain scores (scale, softcap, ALiBi, masks).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "params.h"
#include "vec_math.h"

namespace pyattn::cpu {

// One sequence of the batch: where its rows live in the tensors, and its lengths.
struct Seq {
  int64_t tb = 0;  // batch index into q / out / lse (varlen: 0)
  int64_t kb = 0;  // batch index into k / v: tb, or the KV-cache row (kv_batch_idx); unused when paged
  int64_t q0 = 0, k0 = 0;  // first row in q / out / lse and in k / v (varlen: cu_seqlens; KV cache: k_start)
  int64_t L = 0, S = 0;
};

inline Seq get_seq(const AttnParams& p, int64_t b) {
  if (p.seqused_k != nullptr) {
    const int64_t k0 = p.k_start != nullptr ? p.k_start[b] : 0;
    return {b, p.kv_batch_idx != nullptr ? p.kv_batch_idx[b] : b, 0, k0, p.seqlen_q, p.seqused_k[b] - k0};
  }
  if (p.cu_seqlens_q == nullptr) return {b, b, 0, 0, p.seqlen_q, p.seqlen_k};
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  return {0, 0, q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
}

// The sink logit of q head h (p.sinks != nullptr), natural units.
inline double sink_logit(const AttnParams& p, int64_t h) {
  return p.sinks_f64 ? static_cast<const double*>(p.sinks)[h] : double(static_cast<const float*>(p.sinks)[h]);
}

// Rows of one kv head of k or v for a sequence: key j (0-based in the sequence) and how many keys from j on
// are evenly strided (to the end of its page; all of them without paging).
template <typename scalar_t>
struct KeyRows {
  const scalar_t* base;  // (kb, head) of a dense tensor; (page 0, head) when paged
  int64_t row_stride, page_stride, k0, page_size;
  const int32_t* pages;  // this sequence's block_table row, or nullptr

  KeyRows(const AttnParams& p, const Seq& s, int64_t b, const void* t, const Strides4& st, int64_t hk)
      : base(static_cast<const scalar_t*>(t) + hk * st.head), row_stride(st.row), page_stride(st.batch), k0(s.k0),
        page_size(p.page_size), pages(p.block_table != nullptr ? p.block_table + b * p.block_table_stride : nullptr) {
    if (pages == nullptr) base += s.kb * st.batch;
  }
  const scalar_t* row(int64_t j) const {
    const int64_t pos = k0 + j;
    if (pages == nullptr) return base + pos * row_stride;
    return base + pages[pos / page_size] * page_stride + pos % page_size * row_stride;
  }
  int64_t run(int64_t j, int64_t n) const {
    return pages == nullptr ? n : std::min(n, page_size - (k0 + j) % page_size);
  }
};

// Query i may see keys [lo(i), hi(i)); key j is seen by queries [qlo(j), qhi(j)). Both bounds grow
// with their argument, so block ranges come from the block's end rows.
struct Band {
  int64_t wl, wr, shift, L, S;

  int64_t lo(int64_t i) const { return wl < 0 ? 0 : std::clamp(i + shift - wl, int64_t(0), S); }
  int64_t hi(int64_t i) const { return wr < 0 ? S : std::clamp(i + shift + wr + 1, int64_t(0), S); }
  int64_t qlo(int64_t j) const { return wr < 0 ? 0 : std::clamp(j - wr - shift, int64_t(0), L); }
  int64_t qhi(int64_t j) const { return wl < 0 ? L : std::clamp(j + wl - shift + 1, int64_t(0), L); }
  // Keys any query of [i0, i1) may see, and queries that may see any key of [j0, j1); empty -> first >= second.
  std::pair<int64_t, int64_t> keys(int64_t i0, int64_t i1) const { return {lo(i0), hi(i1 - 1)}; }
  std::pair<int64_t, int64_t> queries(int64_t j0, int64_t j1) const { return {qlo(j0), qhi(j1 - 1)}; }
  // Every (query, key) of the tile is allowed.
  bool covers(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const { return lo(i1 - 1) <= j0 && hi(i0) >= j1; }
};

inline Band make_band(const AttnParams& p, const Seq& s) {
  return {p.window_left, p.window_right, p.bottom_right ? s.S - s.L : 0, s.L, s.S};
}

// Scores of one (sequence, q head). scalar_t is q's dtype (the type of a kMaskLikeQ mask).
template <typename scalar_t, typename acc>
struct Scores {
  Band band;
  acc scale, softcap, slope;
  bool alibi;
  const void* mask;  // at (b, h, 0, 0)
  int mask_kind;
  int64_t mask_rs, mask_cs;
  bool plain;  // no softcap, ALiBi or mask, scale > 0: an unmasked tile needs only the scale

  Scores(const AttnParams& p, const Seq& s, int64_t b, int64_t h)
      : band(make_band(p, s)), scale(acc(p.scale)), softcap(acc(p.softcap)), slope(0), alibi(p.alibi_slopes != nullptr),
        mask(nullptr), mask_kind(p.mask_kind), mask_rs(p.mask_strides.row), mask_cs(p.mask_strides.col) {
    if (alibi) slope = p.alibi_slopes[b * p.alibi_batch_stride + h * p.alibi_head_stride];
    if (p.mask != nullptr) {
      const int64_t elem = mask_kind == kMaskBool ? 1 : mask_kind == kMaskLikeQ ? sizeof(scalar_t) : sizeof(float);
      mask = static_cast<const char*>(p.mask) + (b * p.mask_strides.batch + h * p.mask_strides.head) * elem;
    }
    plain = softcap <= 0 && !alibi && mask == nullptr && scale > 0;
  }

  // Turns a tile of raw q.k into log2-domain scores, -inf where not allowed. Tile element (r, c) is
  // (query i0 + r, key j0 + c), or (query i0 + c, key j0 + r) when kT (backward's transposed tiles).
  // Returns the factor still to multiply by: scale * log2(e) for an unmasked plain tile, which is
  // left raw so the exp2 pass folds the scale in; else 1. dcap (same layout, optional) gets
  // d(softcap(x)) / dx = 1 - tanh^2.
  template <bool kT>
  acc apply(acc* s, int64_t ld, int64_t i0, int64_t ni, int64_t j0, int64_t nj, acc* dcap) const {
    const acc log2e = acc(kLog2e);
    if (plain && band.covers(i0, i0 + ni, j0, j0 + nj)) return scale * log2e;
    const int64_t rows = kT ? nj : ni, cols = kT ? ni : nj;
    for (int64_t r = 0; r < rows; ++r) {
      acc* x = s + r * ld;
      if (softcap > 0) {
        softcap_row(x, cols, scale / softcap, softcap, dcap != nullptr ? dcap + r * ld : nullptr);
      } else {
        for (int64_t c = 0; c < cols; ++c) x[c] *= scale;
      }
      if (alibi) {
        // -slope * |i' - j| with i' - j = base +- c along the row
        const int64_t base = kT ? i0 + band.shift - (j0 + r) : i0 + r + band.shift - j0;
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t d = kT ? base + c : base - c;
          x[c] -= slope * acc(d < 0 ? -d : d);
        }
      }
      for (int64_t c = 0; c < cols; ++c) x[c] *= log2e;
      // outside the band
      int64_t lo, hi;
      if (kT) {
        lo = band.qlo(j0 + r) - i0;
        hi = band.qhi(j0 + r) - i0;
      } else {
        lo = band.lo(i0 + r) - j0;
        hi = band.hi(i0 + r) - j0;
      }
      lo = std::clamp(lo, int64_t(0), cols);
      hi = std::clamp(hi, lo, cols);
      std::fill(x, x + lo, neg_inf<acc>());
      std::fill(x + hi, x + cols, neg_inf<acc>());
    }
    if (mask != nullptr) add_mask(s, kT ? 1 : ld, kT ? ld : 1, i0, ni, j0, nj);
    return 1;
  }

 private:
  // Mask row by mask row (query by query), so reads follow the mask's usual key-contiguous layout
  // in either tile orientation. x_q, x_k: tile strides along queries and keys. Adds in log2 units.
  void add_mask(acc* s, int64_t x_q, int64_t x_k, int64_t i0, int64_t ni, int64_t j0, int64_t nj) const {
    const acc log2e = acc(kLog2e);
    for (int64_t r = 0; r < ni; ++r) {
      acc* x = s + r * x_q;
      const int64_t off = (i0 + r) * mask_rs + j0 * mask_cs;
      if (mask_kind == kMaskBool) {
        const uint8_t* m = static_cast<const uint8_t*>(mask) + off;
        // adds -inf, as torch does, rather than selecting it: a NaN score under a False stays NaN
        for (int64_t c = 0; c < nj; ++c) x[c * x_k] += m[c * mask_cs] ? acc(0) : neg_inf<acc>();
      } else if (mask_kind == kMaskLikeQ) {
        const scalar_t* m = static_cast<const scalar_t*>(mask) + off;
        for (int64_t c = 0; c < nj; ++c) x[c * x_k] += static_cast<acc>(m[c * mask_cs]) * log2e;
      } else {
        const float* m = static_cast<const float*>(mask) + off;
        for (int64_t c = 0; c < nj; ++c) x[c * x_k] += static_cast<acc>(m[c * mask_cs]) * log2e;
      }
    }
  }
};

}  // namespace pyattn::cpu
