// Matmul operands in the layouts the micro-kernels want, and the matmul itself. The tile type T is the
// kernels' choice (tile_type below):
//   float  -> fp32 tiles, at::native::cpublas::brgemm: oneDNN's f32 brgemm wherever oneDNN runs at AVX2 or
//             above, else torch's sgemm. fp16 and (where VNNI is not available) bf16 inputs are widened to
//             fp32 when packed: fp16 brgemm ran at 40-80 GFLOP/s on the EPYC, the fp32 one at ~240.
//   bf16   -> bf16 tiles, brgemm with B in VNNI layout (~490 GFLOP/s/thread on Zen 4; plain B gets ~95),
//             only where torch's brgemm takes VNNI bf16 (oneDNN at AVX-512 or above: bf16_vnni_brgemm()).
//   double -> fp64 tiles, plain loops (fp64 is for checking, not speed).
// A operand: M x K row-major, ld = kpad(K). B operand: K x N; plain row-major, or VNNI
// (Bv[k / 2][n][k % 2], K padded to even with zeros). In both, row k of a B operand starts at k * ld_b
// elements, so a block of B starting at an even row is B + k0 * ld_b.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cpu/vec_math.h"

namespace pyattn::cpu {

// Accumulation, softmax and score type of an input dtype.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
constexpr bool kVnni = std::is_same_v<T, c10::BFloat16>;

// The K dimension as stored: VNNI pairs rows, so it rounds up to even.
template <typename T>
constexpr int64_t kpad(int64_t k) { return kVnni<T> ? (k + 1) & ~int64_t(1) : k; }

// Offset of column n in a B operand (VNNI stores the pair of a column together).
template <typename T>
constexpr int64_t b_col(int64_t n) { return kVnni<T> ? 2 * n : n; }

// Whether torch's brgemm multiplies bf16 with B in VNNI layout on this CPU now. torch decides per call
// (mkldnn enabled, and oneDNN's effective ISA, which ONEDNN_MAX_CPU_ISA can lower) and raises otherwise,
// oneDNN's own dnnl::error (a std::exception, not a c10::Error) where it has no bf16 brgemm for the ISA, as
// on AVX-512 without BF16 (Skylake, Cascade Lake); one 2x2 probe per process answers for the ISA, the
// mkldnn switch is read each time.
inline bool bf16_vnni_brgemm() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool works = [] {
    const c10::BFloat16 a[2] = {1.f, 1.f}, b[4] = {1.f, 1.f, 1.f, 1.f};
    float c[4];
    try {
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return works;
}

// dst (M, kpad(K)) row-major = src[m * sm + k * sk], zero padding columns.
template <typename T, typename S>
void pack_a(const S* src, int64_t sm, int64_t sk, int64_t M, int64_t K, T* dst) {
  const int64_t ld = kpad<T>(K);
  for (int64_t m = 0; m < M; ++m) {
    const S* s = src + m * sm;
    T* d = dst + m * ld;
    if (sk == 1) {
      convert_row(s, d, K);
    } else {
      for (int64_t k = 0; k < K; ++k) d[k] = static_cast<T>(s[k * sk]);
    }
    for (int64_t k = K; k < ld; ++k) d[k] = T(0);
  }
}

// dst = B operand (K, N) with ld_b = ld (N when ld < 0), from src[k * sk + n * sn]. A transposing pack
// (sn != 1) goes 32 columns at a time, so the source rows it reads stay in L1 while the destination is
// written in runs.
template <typename T, typename S>
void pack_b(const S* src, int64_t sk, int64_t sn, int64_t K, int64_t N, T* dst, int64_t ld = -1) {
  if (ld < 0) ld = N;
  const int64_t step = sn == 1 ? N : 32;
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t n1 = std::min(N, n0 + step);
    if constexpr (kVnni<T> && std::is_same_v<S, T>) {
      // Same 16-bit type: move bits, a VNNI pair (k, k + 1) of column n as one 32-bit word.
      for (int64_t k = 0; k < K; k += 2) {
        uint32_t* d = reinterpret_cast<uint32_t*>(dst + k * ld);
        const bool pair = k + 1 < K;
        if (sk == 1 && pair) {
          // prefetch the next columns' source rows: reads in column order hide them from the hardware
          if (k == 0)
            for (int64_t n = n1; n < std::min(N, n1 + step); ++n)
              for (int64_t c = 0; c < K * int64_t(sizeof(S)); c += 64)
                __builtin_prefetch(reinterpret_cast<const char*>(src + n * sn) + c);
          for (int64_t n = n0; n < n1; ++n) std::memcpy(d + n, src + n * sn + k, 4);
        } else {
          const uint16_t* s0 = reinterpret_cast<const uint16_t*>(src + k * sk);
          const uint16_t* s1 = reinterpret_cast<const uint16_t*>(src + (pair ? k + 1 : k) * sk);
          const uint32_t hi = pair ? 0xffffu : 0u;
          if (sn == 1 && pair) {
            // two rows interleaved (V's key pairs in decode): restrict lets it vectorize to unpacks
            uint32_t* __restrict__ dv = d;
            const uint16_t* __restrict__ r0 = s0;
            const uint16_t* __restrict__ r1 = s1;
            for (int64_t n = n0; n < n1; ++n) dv[n] = uint32_t(r0[n]) | uint32_t(r1[n]) << 16;
          } else if (sn == 1) {
            for (int64_t n = n0; n < n1; ++n) d[n] = s0[n];
          } else {
            for (int64_t n = n0; n < n1; ++n) d[n] = s0[n * sn] | (s1[n * sn] & hi) << 16;
          }
        }
      }
    } else if constexpr (kVnni<T>) {
      for (int64_t k = 0; k < K; k += 2) {
        const S* s0 = src + k * sk;
        const S* s1 = s0 + sk;
        T* d = dst + k * ld;
        if (k + 1 < K) {
          for (int64_t n = n0; n < n1; ++n) {
            d[2 * n] = static_cast<T>(s0[n * sn]);
            d[2 * n + 1] = static_cast<T>(s1[n * sn]);
          }
        } else {
          for (int64_t n = n0; n < n1; ++n) {
            d[2 * n] = static_cast<T>(s0[n * sn]);
            d[2 * n + 1] = T(0);
          }
        }
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const S* s = src + k * sk;
        T* d = dst + k * ld;
        if (sn == 1) {
          convert_row(s + n0, d + n0, n1 - n0);
        } else {
          for (int64_t n = n0; n < n1; ++n) d[n] = static_cast<T>(s[n * sn]);
        }
      }
    }
  }
}

// C (M, N; ldc) = (add ? C : 0) + A (M, K; lda) @ B (K, N; ldb). K is the logical size: the padded
// size is used for VNNI.
template <typename T, typename acc>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, acc* C,
            int64_t ldc, bool add) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t m = 0; m < M; ++m) {
      acc* c = C + m * ldc;
      if (!add) std::memset(c, 0, N * sizeof(acc));
      for (int64_t k = 0; k < K; ++k) {
        const acc a = A[m * lda + k];
        const T* b = B + k * ldb;
        for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
      }
    }
  } else {
    if (K == 0) {
      if (!add)
        for (int64_t m = 0; m < M; ++m) std::memset(C + m * ldc, 0, N * sizeof(acc));
      return;
    }
    at::native::cpublas::brgemm(M, N, kpad<T>(K), lda, ldb, ldc, add, A, B, C, kVnni<T>);
  }
}

// The tile type T as a value (the forward's plan holds one: cpu/fwd_plan.h).
enum class TileType { kFp64, kFp32, kBf16Vnni };

template <typename T>
constexpr TileType tile_type_of = std::is_same_v<T, double> ? TileType::kFp64
                                  : kVnni<T>                ? TileType::kBf16Vnni
                                                            : TileType::kFp32;

// The tile type for inputs of scalar_t: bf16 VNNI tiles where torch's brgemm takes them (compiled in for the
// AVX-512 capabilities only, PYATTN_VNNI_TILES), fp32 tiles otherwise; double stays.
template <typename scalar_t>
TileType tile_type() {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return TileType::kFp64;
  } else {
#if defined(PYATTN_VNNI_TILES)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      if (bf16_vnni_brgemm()) return TileType::kBf16Vnni;
#endif
    return TileType::kFp32;
  }
}

// Calls fn(T{}) with the tile type T that `type` names (one tile_type<scalar_t> gives, or kFp32).
template <typename scalar_t, typename Fn>
void with_tile_type([[maybe_unused]] TileType type, Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    fn(double{});
  } else {
#if defined(PYATTN_VNNI_TILES)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      if (type == TileType::kBf16Vnni) return fn(c10::BFloat16{});
#endif
    fn(float{});
  }
}

template <typename scalar_t, typename Fn>
void with_tile_type(Fn&& fn) {
  with_tile_type<scalar_t>(tile_type<scalar_t>(), fn);
}

// Uninitialized scratch of n elements from torch's CPU allocator (aligned, reused across calls).
template <typename T>
struct Buffer {
  c10::DataPtr data;
  Buffer() = default;
  explicit Buffer(int64_t n) : data(c10::GetCPUAllocator()->allocate(std::max<int64_t>(n, 1) * sizeof(T))) {}
  T* get() const { return static_cast<T*>(data.get()); }
};

template <typename T>
void matmul_release() {
  if constexpr (!std::is_same_v<T, double>) at::native::cpublas::brgemm_release(kVnni<T>);
}

}  // namespace pyattn::cpu
