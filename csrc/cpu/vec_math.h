// Vectorized row math for the online softmax: exp2, max, scaling, rounding to bf16.
// AVX-512 paths under __AVX512F__; scalar fallbacks keep the kernel building on any CPU.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pyattn::cpu {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

#if defined(__AVX512F__)
// 2^x; -inf (and anything below -200) gives exactly 0, NaN stays NaN. Degree-7 Taylor on [-0.5, 0.5]
// keeps the relative error near 1e-8, below float rounding.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// max_j x[j]
template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 fill = _mm512_set1_ps(m);
    __m512 vm = fill;
    for (; j < n; j += 16) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(fill, tail_mask(n - j), x + j));
    return _mm512_reduce_max_ps(vm);
  }
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = 2^(x[j] * c - m), returns the sum. m == -inf must be handled by the caller.
template <typename T>
inline T exp2_row(T* x, int64_t n, T c, T m) {
  int64_t j = 0;
  T sum = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(-m);
    __m512 vs = _mm512_setzero_ps();
    for (; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      const __m512 p = exp2_ps(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + j), vc, vm));
      _mm512_mask_storeu_ps(x + j, k, p);
      vs = _mm512_mask_add_ps(vs, k, vs, p);
    }
    return _mm512_reduce_add_ps(vs);
  }
#endif
  for (; j < n; ++j) {
    x[j] = std::exp2(x[j] * c - m);
    sum += x[j];
  }
  return sum;
}

// x[j] = 2^x[j]
template <typename T>
inline void exp2_inplace(T* x, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      _mm512_mask_storeu_ps(x + j, k, exp2_ps(_mm512_maskz_loadu_ps(k, x + j)));
    }
    return;
  }
#endif
  for (; j < n; ++j) x[j] = std::exp2(x[j]);
}

// x[j] = cap * tanh(x[j] * a), and d[j] = 1 - tanh^2 (the slope) when d != nullptr.
template <typename T>
inline void softcap_row(T* x, int64_t n, T a, T cap, T* d) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // tanh(y) = 1 - 2 / (2^(2 y log2 e) + 1): saturates to +-1 without overflow
    const __m512 va = _mm512_set1_ps(2 * a * float(kLog2e)), one = _mm512_set1_ps(1.f), vcap = _mm512_set1_ps(cap);
    for (; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), va));
      const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
      _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(vcap, t));
      if (d != nullptr) _mm512_mask_storeu_ps(d + j, k, _mm512_fnmadd_ps(t, t, one));
    }
    return;
  }
#endif
  for (; j < n; ++j) {
    const T t = std::tanh(x[j] * a);
    x[j] = cap * t;
    if (d != nullptr) d[j] = 1 - t * t;
  }
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// dst[j] = src[j] rounded to the compute type (bf16: round to nearest even).
template <typename T, typename A>
inline void convert_row(const A* src, T* dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    for (; j + 16 <= n; j += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)v);
    }
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

}  // namespace pyattn::cpu
