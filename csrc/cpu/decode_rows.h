// Decode's key blocks on AVX512-BF16 without brgemm: q.k and P V as vdpbf16ps on the cache rows where they lie.
// Decode does a few flops per byte it reads (4 q rows per kv head at 32:8 heads), so a step is a stream of the
// cache, and what counts is keeping the memory busy:
//   - brgemm's calls and the VNNI packing of V cost more than the math (130 TSC cycles a key and head from L3
//     on the Sapphire Rapids, 66 of them P V's pack and call); here q.k and P V read the rows once, as they lie;
//   - the rows are read in memory order, a group of keys of all kv heads at a time (attend_block_rows), and the
//     next group is prefetched into L2 while the current one is used: reading one head's rows at a time (256 bytes
//     in every 2 KiB at 8 heads of 128) ran at ~60% of the speed of memory order, and memory order without the
//     prefetch at ~68% (64k tokens, 2 threads).
// The probabilities are bf16 as for the brgemm path; the sums are fp32.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define PYATTN_DECODE_ROWS 1
#include <immintrin.h>
#endif

namespace pyattn::cpu {

#if defined(PYATTN_DECODE_ROWS)
constexpr bool kDecodeRows = true;
#else
constexpr bool kDecodeRows = false;
#endif
constexpr int64_t kDecodeRowsMax = 8;  // q rows a tile may have (group * L): the kernels' registers

// Whether decode_rows_* take a tile of M rows and these head dims here: whole 32-element chunks, up to 256.
inline bool decode_rows_fit(int64_t M, int64_t E, int64_t Ev) {
  return kDecodeRows && M <= kDecodeRowsMax && E % 32 == 0 && Ev % 32 == 0 && E <= 256 && Ev <= 256;
}

// Rows to prefetch: rows[i] + offset for i < n, bytes each.
struct RowsPrefetch {
  const c10::BFloat16* const* rows = nullptr;
  int64_t offset = 0, n = 0, bytes = 0;
  inline void operator()(int64_t i) const;
};

#if defined(PYATTN_DECODE_ROWS)

// Lanes i of the result = the sum of the 16 lanes of v[i].
inline __m512 sum_lanes16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // u[i]'s 128-bit lane L: partial sums of v[4i .. 4i + 3] over lane L of each
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
}

// The L2, not L1: a group's rows of all heads (64 KiB) are more than L1 holds beside the current ones.
// As asm: GCC 12 drops _mm_prefetch from the kernels' loops (none was left in the object code).
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) asm volatile("prefetcht1 %0" : : "m"(*(static_cast<const char*>(row) + c)));
}

void RowsPrefetch::operator()(int64_t i) const {
  if (i < n) prefetch_row(rows[i] + offset, bytes);
}

// s (M, nj; ld lds) = q (M, E = 32 NC; ld ldq) @ K^T, K's row i at krows[i] + koff; prefetches pf's rows along.
// M and NC are template arguments so that q and the accumulators live in registers (runtime ones spilled them all).
template <int M, int NC>
void decode_rows_scores_t(const c10::BFloat16* const* krows, int64_t koff, int64_t nj, const c10::BFloat16* q,
                          int64_t ldq, float* s, int64_t lds, const RowsPrefetch& pf) {
  __m512bh qv[M][NC];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < NC; ++c) qv[r][c] = (__m512bh)_mm512_loadu_si512(q + r * ldq + 32 * c);
  for (int64_t j0 = 0; j0 < nj; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, nj - j0);
    __m512 acc[M][16];
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= n) {
        for (int r = 0; r < M; ++r) acc[r][i] = _mm512_setzero_ps();
        continue;
      }
      pf(j0 + i);
      __m512bh k[NC];
      for (int c = 0; c < NC; ++c) k[c] = (__m512bh)_mm512_loadu_si512(krows[j0 + i] + koff + 32 * c);
      for (int r = 0; r < M; ++r) {
        // two chains: dpbf16's latency, not its throughput, would set the pace of one
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), k[0], qv[r][0]), b = _mm512_setzero_ps();
        for (int c = 1; c < NC; ++c) {
          if (c % 2) b = _mm512_dpbf16_ps(b, k[c], qv[r][c]);
          else a = _mm512_dpbf16_ps(a, k[c], qv[r][c]);
        }
        acc[r][i] = _mm512_add_ps(a, b);
      }
    }
    for (int r = 0; r < M; ++r)
      _mm512_mask_storeu_ps(s + r * lds + j0, __mmask16((1u << n) - 1), sum_lanes16(acc[r]));
  }
}

// o (M, Ev; fp32) += p (M, nj bf16; ld ldp, even; p[r][nj] = 0 when nj is odd) @ V, V's row i at vrows[i] + voff;
// prefetches pf's rows along.
// dpbf16 takes keys in pairs: rows j and j + 1 interleaved by unpack, which permutes the columns within each
// 128-bit lane; the accumulators hold o in that order, one band of NC 32-column chunks at a time (registers:
// 2 M NC of them), over key runs short enough for L1 so the bands after the first read the rows from there.
template <int M>
void decode_rows_pv_t(const c10::BFloat16* const* vrows, int64_t voff, int64_t nj, int64_t Ev, const c10::BFloat16* p,
                      int64_t ldp, float* o, const RowsPrefetch& pf) {
  constexpr int NC = M <= 4 ? 2 : 1;
  constexpr int64_t kRun = 64;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t j0 = 0; j0 < nj; j0 += kRun) {
    const int64_t n = std::min(kRun, nj - j0);
    for (int64_t c0 = 0; c0 < Ev; c0 += 32 * NC) {
      const int nc = std::min<int64_t>(NC, (Ev - c0) / 32);
      __m512 acc[M][2 * NC];
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < 2 * NC; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t j = j0; j < j0 + n; j += 2) {
        if (c0 == 0) {
          pf(j);
          pf(j + 1);
        }
        __m512bh x[2 * NC];
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          const __m512i a = _mm512_loadu_si512(vrows[j] + voff + c0 + 32 * c);
          const __m512i b = j + 1 < nj ? _mm512_loadu_si512(vrows[j + 1] + voff + c0 + 32 * c) : zero;
          x[2 * c] = (__m512bh)_mm512_unpacklo_epi16(a, b);
          x[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
        }
        for (int r = 0; r < M; ++r) {
          const __m512bh pair = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p + r * ldp + j));
          for (int c = 0; c < 2 * NC; ++c)
            if (c < 2 * nc) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x[c], pair);
        }
      }
      // unpacklo/hi of a chunk hold, per 128-bit lane L, its columns 8L + 0..3 and 8L + 4..7: back in order
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < nc; ++c) {
          float* dst = o + r * Ev + c0 + 32 * c;
          const __m512 lo = acc[r][2 * c], hi = acc[r][2 * c + 1];
          _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_permutex2var_ps(lo, first, hi)));
          _mm512_storeu_ps(dst + 16,
                           _mm512_add_ps(_mm512_loadu_ps(dst + 16), _mm512_permutex2var_ps(lo, second, hi)));
        }
    }
  }
}

// fn(std::integral_constant<int, n>{}) for a runtime n in [1, 8]: the kernels' sizes as template arguments.
template <typename Fn>
void with_size_1_to_8(int64_t n, Fn&& fn) {
  switch (n) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// The two above for runtime sizes: M q rows (<= kDecodeRowsMax), head dims E and Ev (decode_rows_fit).
inline void decode_rows_scores(const c10::BFloat16* const* krows, int64_t koff, int64_t nj, int64_t E,
                               const c10::BFloat16* q, int64_t ldq, int64_t M, float* s, int64_t lds,
                               const RowsPrefetch& pf) {
  with_size_1_to_8(M, [&](auto m) {
    with_size_1_to_8(E / 32, [&](auto nc) { decode_rows_scores_t<m(), nc()>(krows, koff, nj, q, ldq, s, lds, pf); });
  });
}

inline void decode_rows_pv(const c10::BFloat16* const* vrows, int64_t voff, int64_t nj, int64_t Ev,
                           const c10::BFloat16* p, int64_t ldp, int64_t M, float* o, const RowsPrefetch& pf) {
  with_size_1_to_8(M, [&](auto m) { decode_rows_pv_t<m()>(vrows, voff, nj, Ev, p, ldp, o, pf); });
}

#endif  // PYATTN_DECODE_ROWS

}  // namespace pyattn::cpu
