// Row math for the online softmax on torch's portable vectors (at::vec::Vectorized: AVX2, AVX-512, NEON,
// SVE or plain C++, whichever this translation unit is compiled for; see setup.py's CPU capabilities).
// float rows are vectorized; double rows (the checking dtype) stay scalar. NaN propagates everywhere:
// a NaN score makes its row's max, sum and output NaN, as in torch.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pyattn::cpu {

using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// a, b -> their 2W values as D (bf16 or fp16, round to nearest even) at out; n < 2W stores the first n. On
// AVX512-BF16, bf16 takes one vcvtne2ps2bf16 (it flushes results below 2^-126 to zero) where torch's portable
// conversion rounds in ~6 integer instructions a vector (~30% of the bf16 softmax's perf samples).
template <typename D>
inline void store_pair(const Vec& a, const Vec& b, D* out, int64_t n = 2 * Vec::size()) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<D, c10::BFloat16>) {
    const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(__m512(b), __m512(a)));
    if (n == 2 * Vec::size())
      _mm512_storeu_si512(out, v);
    else
      _mm512_mask_storeu_epi16(out, __mmask32((uint64_t(1) << n) - 1), v);
    return;
  }
#endif
  const auto v = at::vec::convert_from_float<D>(a, b);
  if (n == 2 * Vec::size())
    v.store(out);
  else
    v.store(out, n);
}

// max that keeps NaN (std::max(m, NaN) would return m and hide it).
template <typename T>
inline T nan_max(T a, T b) { return (b > a || std::isnan(b)) ? b : a; }

// 2^x. Anything below -126.5 (-inf included) gives exactly 0, NaN stays NaN. x = n + f with |f| <= 1/2;
// the degree-7 Taylor polynomial of 2^f has relative error ~1e-8, below float rounding; 2^n is built in the
// exponent bits, and n = -127 gives the bit pattern of +0. kCheap: a degree-4 polynomial fitted for relative
// error on [-1/2, 1/2] (3.1e-6), for probabilities of bf16/fp16 inputs, whose own rounding (3.9e-3, 4.9e-4)
// dwarfs it: three fewer FMAs per vector in the softmax, which is most of a bf16 forward on AMX.
template <bool kCheap = false>
inline Vec exp2(Vec x) {
#if defined(CPU_CAPABILITY_AVX512)
  // vmaxps/vminps return their second operand when one is NaN: NaN passes in one instruction each, where
  // at::vec::maximum/minimum add three to propagate it (6-8% of a bf16 forward on AMX, 2-3% of fp32, measured).
  x = Vec(_mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), __m512(x))));
#else
  x = at::vec::minimum(at::vec::maximum(x, Vec(-127.f)), Vec(127.f));
#endif
  const Vec n = x.round();
  const Vec f = x - n;
  Vec p;
  if constexpr (kCheap) {
    p = Vec(9.588480807285233e-03f);
    p = at::vec::fmadd(p, f, Vec(5.5919779886302694e-02f));
    p = at::vec::fmadd(p, f, Vec(2.4024053065610898e-01f));
    p = at::vec::fmadd(p, f, Vec(6.931222770225898e-01f));
    p = at::vec::fmadd(p, f, Vec(1.f));
  } else {
    p = Vec(1.525273380405984e-05f);
    p = at::vec::fmadd(p, f, Vec(1.5403530393381606e-04f));
    p = at::vec::fmadd(p, f, Vec(1.3333558146428443e-03f));
    p = at::vec::fmadd(p, f, Vec(9.618129107628477e-03f));
    p = at::vec::fmadd(p, f, Vec(5.550410866482158e-02f));
    p = at::vec::fmadd(p, f, Vec(2.402265069591007e-01f));
    p = at::vec::fmadd(p, f, Vec(6.931471805599453e-01f));
    p = at::vec::fmadd(p, f, Vec(1.f));
  }
  const VecI bits = (at::vec::convert_to_int_of_same_size(n) + VecI(127)) * VecI(1 << 23);
  return p * at::vec::cast<float>(bits);
}

// Applies fn to x[j] one vector at a time; the tail is loaded partially and stored partially.
template <typename Fn>
inline void map_row(float* x, int64_t n, Fn fn) {
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) fn(Vec::loadu(x + j)).store(x + j);
  if (j < n) fn(Vec::loadu(x + j, n - j)).store(x + j, n - j);
}

// max_j x[j]
template <typename T>
inline T row_max(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t W = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
    // Four independent maxima (one chain of at::vec::maximum ran at its latency, ~5 cycles a vector) and the
    // NaN test beside them, off the chain: a bf16 forward on AMX 12-16% faster, measured.
    const __m512 fill = _mm512_set1_ps(neg_inf<float>());
    __m512 m0 = fill, m1 = fill, m2 = fill, m3 = fill;
    __mmask16 nan = 0;
    int64_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
      const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + W);
      const __m512 c = _mm512_loadu_ps(x + j + 2 * W), d = _mm512_loadu_ps(x + j + 3 * W);
      m0 = _mm512_max_ps(m0, a);
      m1 = _mm512_max_ps(m1, b);
      m2 = _mm512_max_ps(m2, c);
      m3 = _mm512_max_ps(m3, d);
      nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
    }
    for (; j < n; j += W) {
      const __m512 a = _mm512_mask_loadu_ps(fill, __mmask16((uint32_t(1) << std::min(W, n - j)) - 1), x + j);
      m0 = _mm512_max_ps(m0, a);
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
#else
    const Vec fill(neg_inf<float>());
    Vec vm = fill;
    int64_t j = 0;
    for (; j + W <= n; j += W) vm = at::vec::maximum(vm, Vec::loadu(x + j));
    if (j < n) vm = at::vec::maximum(vm, Vec::set(fill, Vec::loadu(x + j, n - j), n - j));
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
#endif
  } else {
    T m = neg_inf<T>();
    for (int64_t j = 0; j < n; ++j) m = nan_max(m, x[j]);
    return m;
  }
}

// x[j] = 2^(x[j] * c - m), returns the sum. m == -inf must be handled by the caller.
template <bool kCheap = false, typename T>
inline T exp2_row(T* x, int64_t n, T c, T m) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t W = Vec::size();
    const Vec vc(c), vm(-m);
    Vec vs(0.f);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const Vec p = exp2<kCheap>(at::vec::fmadd(Vec::loadu(x + j), vc, vm));
      p.store(x + j);
      vs = vs + p;
    }
    if (j < n) {
      const Vec p = exp2<kCheap>(at::vec::fmadd(Vec::loadu(x + j, n - j), vc, vm));
      p.store(x + j, n - j);
      vs = vs + Vec::set(Vec(0.f), p, n - j);
    }
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vs);
  } else {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      x[j] = std::exp2(x[j] * c - m);
      sum += x[j];
    }
    return sum;
  }
}

// out[j] = fn(x[j]) rounded to D (bf16 or fp16), a pair of vectors at a time; returns the float sum of fn's
// values (in two accumulators: one chain of adds would set the pace).
template <typename D, typename Fn>
inline float map_row_to(const float* x, D* out, int64_t n, Fn fn) {
  constexpr int64_t W = Vec::size();
  const Vec zero(0.f);
  Vec vs(0.f), vs2(0.f);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const Vec a = fn(Vec::loadu(x + j)), b = fn(Vec::loadu(x + j + W));
    vs = vs + a;
    vs2 = vs2 + b;
    store_pair(a, b, out + j);
  }
  if (j < n) {
    const int64_t na = std::min(W, n - j), nb = n - j - na;
    const Vec a = Vec::set(zero, fn(Vec::loadu(x + j, na)), na);
    const Vec b = nb > 0 ? Vec::set(zero, fn(Vec::loadu(x + j + W, nb)), nb) : zero;
    vs = vs + a;
    vs2 = vs2 + b;
    store_pair(a, b, out + j, n - j);
  }
  return at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, vs + vs2);
}

// out[j] = 2^(x[j] * c - m) rounded to D (bf16 or fp16), returns the float sum: exp2_row and convert_row in one
// pass, the probabilities never stored as float. m == -inf must be handled by the caller.
template <bool kCheap, typename D>
inline float exp2_row_to(const float* x, D* out, int64_t n, float c, float m) {
  const Vec vc(c), vm(-m);
  return map_row_to(x, out, n, [&](Vec v) { return exp2<kCheap>(at::vec::fmadd(v, vc, vm)); });
}

// x[j] = 2^(x[j] * c - sub[j]): probabilities from raw scores and per-column log2 sums (backward's P^T).
template <typename T>
inline void exp2_sub_row(T* x, int64_t n, T c, const T* sub) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t W = Vec::size();
    int64_t j = 0;
    for (; j + W <= n; j += W) exp2(at::vec::fmsub(Vec::loadu(x + j), Vec(c), Vec::loadu(sub + j))).store(x + j);
    if (j < n) exp2(at::vec::fmsub(Vec::loadu(x + j, n - j), Vec(c), Vec::loadu(sub + j, n - j))).store(x + j, n - j);
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = std::exp2(x[j] * c - sub[j]);
  }
}

// x[j] = cap * tanh(x[j] * a), and d[j] = 1 - tanh^2 (the slope) when d != nullptr.
template <typename T>
inline void softcap_row(T* x, int64_t n, T a, T cap, T* d) {
  if constexpr (std::is_same_v<T, float>) {
    // tanh(y) = 1 - 2 / (2^(2 y log2 e) + 1): saturates to +-1 without overflow
    constexpr int64_t W = Vec::size();
    const Vec va(2 * a * float(kLog2e)), one(1.f), two(2.f), vcap(cap);
    for (int64_t j = 0; j < n; j += W) {
      const int64_t k = std::min(W, n - j);
      const Vec t = one - two / (exp2(Vec::loadu(x + j, k) * va) + one);
      (vcap * t).store(x + j, k);
      if (d != nullptr) at::vec::fnmadd(t, t, one).store(d + j, k);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T t = std::tanh(x[j] * a);
      x[j] = cap * t;
      if (d != nullptr) d[j] = 1 - t * t;
    }
  }
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec va(a);
    map_row(x, n, [&](Vec v) { return v * va; });
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] *= a;
  }
}

// dst[j] = src[j] in dst's type (bf16, fp16: round to nearest even), with a vectorized path for the pairs
// the kernels use (float <-> bf16/fp16, same type).
template <typename D, typename S>
inline void convert_row(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<D, S>) {
    std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<S, float> && (std::is_same_v<D, c10::BFloat16> || std::is_same_v<D, c10::Half>)) {
    map_row_to(src, dst, n, [](Vec v) { return v; });
  } else if constexpr (std::is_same_v<D, float> && (std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>)) {
    constexpr int64_t W = Vec::size();
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      Vec v;
      at::vec::load_to_float(src + j, v);
      v.store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<D>(src[j]);
  }
}

}  // namespace pyattn::cpu
