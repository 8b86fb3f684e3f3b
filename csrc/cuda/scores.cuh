// Where a (batch, head) lives in the tensors, and the score of one (query i, key j) pair in the log2 domain:
// softcap, ALiBi, the mask, the window (causal is window_right = 0) and the key bound, as csrc/params.h says.
#pragma once
#include <cstdint>

#include "cuda/ptx.cuh"
#include "params.h"

namespace pyattn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows of sequence b: dense tensors offset by batch, varlen ones (B == 1) by cu_seqlens, KV caches
// (p.seqused_k) by cache row and first cache position (csrc/params.h).
struct Seq {
  int64_t q_row0 = 0, k_row0 = 0;  // first packed row (0 when dense); KV cache: k_row0 = first cache position
  int len_q = 0, len_k = 0;
  int64_t batch = 0;     // batch index into q / out / lse (0 when varlen)
  int64_t kv_batch = 0;  // batch index into k / v: batch, or the KV-cache row (unused when paged)
  int shift = 0;         // i' - i: len_k - len_q when bottom_right
};

__device__ __forceinline__ Seq seq_of(const AttnParams& p, int b) {
  Seq s;
  if (p.seqused_k) {
    s.batch = b;
    s.kv_batch = p.kv_batch_idx ? p.kv_batch_idx[b] : b;
    s.k_row0 = p.k_start ? p.k_start[b] : 0;
    s.len_q = static_cast<int>(p.seqlen_q);
    s.len_k = p.seqused_k[b] - static_cast<int>(s.k_row0);
  } else if (p.cu_seqlens_q) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.len_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    s.batch = s.kv_batch = b;
    s.len_q = static_cast<int>(p.seqlen_q);
    s.len_k = static_cast<int>(p.seqlen_k);
  }
  s.shift = p.bottom_right ? s.len_k - s.len_q : 0;
  return s;
}

// Element offset of row `row` of sequence s, head h, in a tensor with strides st.
__device__ __forceinline__ int64_t row_offset(const Strides4& st, const Seq& s, int64_t row0, int h, int row) {
  return s.batch * st.batch + h * st.head + (row0 + row) * st.row;
}

// Key rows of sequence s in k or v (strides st) for kv head hk: key_base once, then key_row per key j (the
// sequence's j-th key, at cache position k_row0 + j). Dense and varlen rows are evenly strided; paged caches
// (p.block_table) find each row's page in sequence b's block_table row. A row is contiguous in the head dim
// either way, so 16-byte copies of it stay valid.
template <typename T>
__device__ __forceinline__ const T* key_base(const AttnParams& p, const void* t, const Strides4& st, const Seq& s,
                                             int hk) {
  const T* base = static_cast<const T*>(t) + hk * st.head;
  return p.block_table ? base : base + s.kv_batch * st.batch + s.k_row0 * st.row;
}

template <typename T>
__device__ __forceinline__ const T* key_row(const AttnParams& p, const T* base, const Strides4& st, const Seq& s,
                                            int b, int j) {
  if (!p.block_table) return base + j * st.row;
  const int pos = static_cast<int>(s.k_row0) + j, page_size = static_cast<int>(p.page_size);
  const int page = p.block_table[b * p.block_table_stride + pos / page_size];
  return base + page * st.batch + (pos % page_size) * st.row;
}

// Keys a block of queries [i0, i1] can see: [lo, hi] (hi < lo when none), from the window and the length.
// In 64-bit: a window may be wider than any int.
__device__ __forceinline__ void key_range(const AttnParams& p, const Seq& s, int i0, int i1, int& lo, int& hi) {
  lo = p.window_left < 0 ? 0 : static_cast<int>(max(int64_t{0}, i0 + s.shift - p.window_left));
  hi = p.window_right < 0 ? s.len_k - 1 : static_cast<int>(min(int64_t{s.len_k - 1}, i1 + s.shift + p.window_right));
}

// Queries a block of keys [j0, j1] is seen by: the inverse of key_range.
__device__ __forceinline__ void query_range(const AttnParams& p, const Seq& s, int j0, int j1, int& lo, int& hi) {
  lo = p.window_right < 0 ? 0 : static_cast<int>(max(int64_t{0}, j0 - p.window_right - s.shift));
  hi = p.window_left < 0 ? s.len_q - 1 : static_cast<int>(min(int64_t{s.len_q - 1}, j1 + p.window_left - s.shift));
}

// A window side as an int: -1 (unbounded) stays, anything wider than every sequence is clamped.
__device__ __forceinline__ int window_side(int64_t w) { return w < 0 ? -1 : static_cast<int>(min(w, int64_t{1} << 30)); }

template <bool kBf16, bool kWindow>
struct ScoreMod {
  float scale_log2;      // scale * log2(e)
  float cap_log2 = 0;    // softcap * log2(e); 0 = no softcap
  float scale_over_cap = 0;
  float alibi_log2 = 0;  // slope * log2(e)
  const void* mask = nullptr;  // at (b, h)
  int64_t mask_row = 0, mask_col = 0;
  int mask_kind = kMaskNone;
  int window_left, window_right, shift, len_q, len_k;
  bool elementwise;  // anything beyond scale and the key bound

  __device__ ScoreMod(const AttnParams& p, const Seq& s, int b, int h) {
    scale_log2 = static_cast<float>(p.scale) * kLog2e;
    if (p.softcap > 0) {
      cap_log2 = static_cast<float>(p.softcap) * kLog2e;
      scale_over_cap = static_cast<float>(p.scale / p.softcap);
    }
    if (p.alibi_slopes) alibi_log2 = p.alibi_slopes[b * p.alibi_batch_stride + h * p.alibi_head_stride] * kLog2e;
    if (p.mask_kind != kMaskNone) {
      const auto& ms = p.mask_strides;
      const int64_t off = b * ms.batch + h * ms.head;
      mask = p.mask_kind == kMaskBool    ? static_cast<const void*>(static_cast<const bool*>(p.mask) + off)
             : p.mask_kind == kMaskLikeQ ? static_cast<const void*>(static_cast<const elem_t<kBf16>*>(p.mask) + off)
                                        : static_cast<const void*>(static_cast<const float*>(p.mask) + off);
      mask_row = ms.row;
      mask_col = ms.col;
      mask_kind = p.mask_kind;
    }
    window_left = window_side(p.window_left);
    window_right = window_side(p.window_right);
    shift = s.shift;
    len_q = s.len_q;
    len_k = s.len_k;
    elementwise = kWindow || cap_log2 != 0 || alibi_log2 != 0 || mask_kind != kMaskNone;
  }

  // softcap(scale * x) + alibi + mask in log2 units, or -inf where (i, j) may not attend. A False in a bool mask
  // adds -inf, as torch applies it, so a NaN score stays NaN there; the window and the key bound replace it.
  // Rows i >= len_q (padding of the last query block) get a finite value and are never stored.
  __device__ __forceinline__ float operator()(float x, int i, int j) const {
    if (j >= len_k) return -INFINITY;
    if (!elementwise) return x * scale_log2;
    const int ip = i + shift;
    if (kWindow && ((window_left >= 0 && j < ip - window_left) || (window_right >= 0 && j > ip + window_right)))
      return -INFINITY;
    float t = cap_log2 != 0 ? cap_log2 * tanhf(x * scale_over_cap) : x * scale_log2;
    t -= alibi_log2 * static_cast<float>(abs(ip - j));
    if (mask_kind != kMaskNone && i < len_q) {
      const int64_t o = i * mask_row + j * mask_col;
      if (mask_kind == kMaskBool) {
        if (!static_cast<const bool*>(mask)[o]) t -= INFINITY;
      } else if (mask_kind == kMaskLikeQ) {
        t += to_float<kBf16>(static_cast<const elem_t<kBf16>*>(mask)[o]) * kLog2e;
      } else {
        t += static_cast<const float*>(mask)[o] * kLog2e;
      }
    }
    return t;
  }

  // d(score)/d(scale * x) of the softcap: 1 - tanh^2 (1 without softcap).
  __device__ __forceinline__ float cap_grad(float x) const {
    if (cap_log2 == 0) return 1.f;
    const float th = tanhf(x * scale_over_cap);
    return 1.f - th * th;
  }
};

// lse in log2 units for P = exp2(score - lse2); fully masked rows (lse = -inf) get +inf so that P = 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

}  // namespace pyattn::cuda
