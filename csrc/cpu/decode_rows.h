// Decode's key blocks without packing or brgemm: q.k and P V on the cache rows where they lie (attend_block_rows).
// Decode does a few flops per byte it reads (4 q rows per kv head at 32:8 heads), so a step is a stream of the
// cache, and what counts is keeping the memory busy:
//   - brgemm's calls and the packing of V cost more than the math (130 TSC cycles a key and head from L3 on the
//     Sapphire Rapids, 66 of them P V's pack and call); here q.k and P V read the rows once, as they lie;
//   - the rows are read in memory order, a group of keys of all kv heads at a time (attend_block_rows), and the
//     next group is prefetched into L2 while the current one is used: reading one head's rows at a time (256 bytes
//     in every 2 KiB at 8 heads of 128) ran at ~60% of the speed of memory order, and memory order without the
//     prefetch at ~68% (64k tokens, 2 threads).
// The kernels are FMA on at::vec vectors (AVX2, AVX-512, NEON, SVE or plain C++) with fp32 q and probabilities,
// the rows widened as they load (bf16, fp16 or fp32 caches): vdpbf16ps kernels on the bf16 rows, tried on
// AVX512-BF16, ran at the same speed (64k tokens, B = 1 and 16: within 2%), the memory being the limit.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/vec_math.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
namespace pyattn::cpu {

constexpr int64_t kDecodeRowsMax = 8;  // q rows a tile may have (group * L): the kernels' registers

// Whether the kernels take a tile of M rows and these head dims: whole vectors.
inline bool decode_rows_fit(int64_t M, int64_t E, int64_t Ev) {
  return M <= kDecodeRowsMax && E % Vec::size() == 0 && Ev % Vec::size() == 0;
}

// Prefetch of rows[i] + offset bytes, bytes long, for i < n (rows of any element type: the kernels' row pointers).
struct RowsPrefetch {
  const void* const* rows = nullptr;
  int64_t offset = 0, n = 0, bytes = 0;
  inline void operator()(int64_t i) const;
};

// The L2, not L1: a group's rows of all heads (64 KiB) are more than L1 holds beside the current ones.
// As asm: GCC 12 drops _mm_prefetch and __builtin_prefetch from the kernels' loops (none was left in the object code).
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) {
    const char* at = static_cast<const char*>(row) + c;
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht1 %0" : : "m"(*at));
#elif defined(__aarch64__)
    asm volatile("prfm pldl2keep, [%0]" : : "r"(at));
#else
    __builtin_prefetch(at, 0, 2);
#endif
  }
}

void RowsPrefetch::operator()(int64_t i) const {
  if (i < n) prefetch_row(static_cast<const char*>(rows[i]) + offset, bytes);
}

// Row i of a kernel's rows: rows[i] + offset elements of S.
template <typename S>
inline const S* row_at(const void* const* rows, int64_t i, int64_t offset) {
  return static_cast<const S*>(rows[i]) + offset;
}

// Lane i of the result = the sum of the lanes of v[i], for Vec::size() vectors: W sums in a few shuffles and adds
// where reducing each vector alone would take log2(W) rounds apiece.
inline Vec sum_lanes(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
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
#elif defined(CPU_CAPABILITY_AVX2)
  // hadd pairs neighbours within each 128-bit half: after two rounds, half H of u0 holds half H's sums of v[0..3]
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  float sums[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) sums[i] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), v[i]);
  return Vec::loadu(sums);
#endif
}

// Vec::size() elements of S at x, as fp32.
template <typename S>
inline Vec load_fp32(const S* x) {
  if constexpr (std::is_same_v<S, float>) {
    return Vec::loadu(x);
  } else {
    Vec v;
    at::vec::load_to_float(x, v);
    return v;
  }
}

// s (M, nj; ld lds) = q (M, E; ld ldq; fp32) @ K^T, K's row i at row_at<S>(krows, i, koff); prefetches pf's rows.
// Each key's E / W vectors are widened once and multiply all M rows of q (from L1); the W sums of W keys go into
// one vector by sum_lanes.
template <int M, typename S>
void decode_rows_scores_fma(const void* const* krows, int64_t koff, int64_t nj, int64_t E, const float* q,
                            int64_t ldq, float* s, int64_t lds, const RowsPrefetch& pf) {
  constexpr int W = Vec::size();
  constexpr int kChains = M <= 4 ? 2 : 1;  // independent sums per row: FMA's latency, not its throughput
  for (int64_t j0 = 0; j0 < nj; j0 += W) {
    const int64_t n = std::min<int64_t>(W, nj - j0);
    Vec sums[M][W];
    for (int64_t i = 0; i < W; ++i) {
      if (i >= n) {
        for (int r = 0; r < M; ++r) sums[r][i] = Vec(0.f);
        continue;
      }
      pf(j0 + i);
      const S* k = row_at<S>(krows, j0 + i, koff);
      Vec a[M][kChains];
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < kChains; ++c) a[r][c] = Vec(0.f);
      for (int64_t e = 0; e < E; e += kChains * W)
        for (int c = 0; c < kChains; ++c) {
          if (e + c * W >= E) break;
          const Vec kv = load_fp32(k + e + c * W);
          for (int r = 0; r < M; ++r) a[r][c] = at::vec::fmadd(kv, Vec::loadu(q + r * ldq + e + c * W), a[r][c]);
        }
      for (int r = 0; r < M; ++r) {
        sums[r][i] = a[r][0];
        for (int c = 1; c < kChains; ++c) sums[r][i] = sums[r][i] + a[r][c];
      }
    }
    for (int r = 0; r < M; ++r) sum_lanes(sums[r]).store(s + r * lds + j0, n);
  }
}

// o (M, Ev; fp32) += p (M, nj; ld ldp; fp32) @ V, V's row i at row_at<S>(vrows, i, voff); prefetches pf's rows.
// One band of NC vectors of o's columns at a time in registers (M NC accumulators, NC rows' vectors), over key runs
// short enough for L1 so that the bands after the first read the rows from there.
template <int M, typename S>
void decode_rows_pv_fma(const void* const* vrows, int64_t voff, int64_t nj, int64_t Ev, const float* p, int64_t ldp,
                        float* o, const RowsPrefetch& pf) {
  constexpr int W = Vec::size();
  constexpr int kRegs = W * sizeof(float) == 64 ? 32 : 16;  // AVX-512's 32; 16 otherwise (AVX2; NEON: conservative)
  constexpr int NC = std::min(8, std::max(1, (kRegs - 2) / (M + 1)));
  const int64_t run = std::max<int64_t>(8, 16384 / (Ev * int64_t(sizeof(S))));
  for (int64_t j0 = 0; j0 < nj; j0 += run) {
    const int64_t n = std::min(run, nj - j0);
    for (int64_t c0 = 0; c0 < Ev; c0 += NC * W) {
      const int64_t nc = std::min<int64_t>(NC, (Ev - c0) / W);
      Vec acc[M][NC];
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < NC; ++c)
          if (c < nc) acc[r][c] = Vec::loadu(o + r * Ev + c0 + c * W);
      for (int64_t j = j0; j < j0 + n; ++j) {
        if (c0 == 0) pf(j);
        const S* v = row_at<S>(vrows, j, voff) + c0;
        Vec x[NC];
        for (int c = 0; c < NC; ++c)
          if (c < nc) x[c] = load_fp32(v + c * W);
        for (int r = 0; r < M; ++r) {
          const Vec pr(p[r * ldp + j]);
          for (int c = 0; c < NC; ++c)
            if (c < nc) acc[r][c] = at::vec::fmadd(x[c], pr, acc[r][c]);
        }
      }
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < NC; ++c)
          if (c < nc) acc[r][c].store(o + r * Ev + c0 + c * W);
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

// The kernels for runtime sizes (decode_rows_fit): the cache's element type S, M q rows, head dims E and Ev.
template <typename S>
void decode_rows_scores(const void* const* krows, int64_t koff, int64_t nj, int64_t E, const float* q, int64_t ldq,
                        int64_t M, float* s, int64_t lds, const RowsPrefetch& pf) {
  with_size_1_to_8(M, [&](auto m) { decode_rows_scores_fma<m(), S>(krows, koff, nj, E, q, ldq, s, lds, pf); });
}

template <typename S>
void decode_rows_pv(const void* const* vrows, int64_t voff, int64_t nj, int64_t Ev, const float* p, int64_t ldp,
                    int64_t M, float* o, const RowsPrefetch& pf) {
  with_size_1_to_8(M, [&](auto m) { decode_rows_pv_fma<m(), S>(vrows, voff, nj, Ev, p, ldp, o, pf); });
}

}  // namespace pyattn::cpu
