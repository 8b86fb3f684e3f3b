// Counter-based RNG for dropout: Philox4x32-10 of (seed, offset, b*H + h, i, j / 4). Forward, backward
// and cpu_dropout_mask draw the same keep-mask from the same (seed, offset) with no state.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pyattn::cpu {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Low and high 32 bits of m * x for 16 lanes.
inline void mul_lohi(__m512i x, __m512i m, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#endif

// keep[jj] = 1 iff element (bh, i, j0 + jj) survives dropout with drop probability p (0 < p < 1).
// bh = b * H + h (b: sequence index in varlen mode; i, j local to the sequence). Runs 16 Philox
// blocks (64 columns) side by side.
inline void dropout_keep_row(uint64_t seed, uint64_t offset, uint64_t bh, int64_t i, int64_t j0, int64_t n,
                             float p, uint8_t* keep) {
  constexpr int kLanes = 16;
  const double t = double(p) * 4294967296.0;
  const uint32_t threshold = t >= 4294967295.0 ? 4294967295u : uint32_t(t);
  const uint32_t key0 = uint32_t(seed), key1 = uint32_t(seed >> 32) ^ uint32_t(offset >> 32);
  const int64_t end = j0 + n;
  for (int64_t g0 = j0 >> 2; 4 * g0 < end; g0 += kLanes) {
    const int64_t lo = std::max<int64_t>(j0, 4 * g0), hi = std::min<int64_t>(end, 4 * (g0 + kLanes));
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // Hand-written for AVX-512 because it measured faster: B=1 H=8 N=2048 D=64 fp32 forward, one thread, the
    // dropout pass costs 31 ms here and 100 ms as the lane loop below compiled for AVX-512 (Xeon, thread time).
    __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(g0))),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i x1 = _mm512_set1_epi32(int(uint32_t(i))), x2 = _mm512_set1_epi32(int(uint32_t(bh)));
    __m512i x3 = _mm512_set1_epi32(int(uint32_t(offset)));
    const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      __m512i lo0, hi0, lo1, hi1;
      mul_lohi(x0, m0, lo0, hi0);
      mul_lohi(x2, m1, lo1, hi1);
      x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), _mm512_set1_epi32(int(k0)));
      x1 = lo1;
      x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(int(k1)));
      x3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // word w of lane l is column 4 * (g0 + l) + w: interleave the four keep masks bytewise
    const __m512i th = _mm512_set1_epi32(int(threshold));
    const __m128i b0 = _mm_maskz_set1_epi8(_mm512_cmpge_epu32_mask(x0, th), 1);
    const __m128i b1 = _mm_maskz_set1_epi8(_mm512_cmpge_epu32_mask(x1, th), 1);
    const __m128i b2 = _mm_maskz_set1_epi8(_mm512_cmpge_epu32_mask(x2, th), 1);
    const __m128i b3 = _mm_maskz_set1_epi8(_mm512_cmpge_epu32_mask(x3, th), 1);
    const __m128i t0 = _mm_unpacklo_epi8(b0, b1), t1 = _mm_unpackhi_epi8(b0, b1);
    const __m128i t2 = _mm_unpacklo_epi8(b2, b3), t3 = _mm_unpackhi_epi8(b2, b3);
    alignas(64) uint8_t bytes[4 * kLanes];
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm_unpacklo_epi16(t0, t2));
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes + 16), _mm_unpackhi_epi16(t0, t2));
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes + 32), _mm_unpacklo_epi16(t1, t3));
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes + 48), _mm_unpackhi_epi16(t1, t3));
    std::memcpy(keep + (lo - j0), bytes + (lo - 4 * g0), hi - lo);
#else
    // Portable: lanes in arrays, which the compiler vectorizes for the capability's ISA.
    uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      x0[l] = uint32_t(g0 + l);
      x1[l] = uint32_t(i);
      x2[l] = uint32_t(bh);
      x3[l] = uint32_t(offset);
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t p0 = uint64_t(0xD2511F53u) * x0[l];
        const uint64_t p1 = uint64_t(0xCD9E8D57u) * x2[l];
        x0[l] = uint32_t(p1 >> 32) ^ x1[l] ^ k0;
        x1[l] = uint32_t(p1);
        x2[l] = uint32_t(p0 >> 32) ^ x3[l] ^ k1;
        x3[l] = uint32_t(p0);
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t* words[4] = {x0, x1, x2, x3};
    for (int64_t j = lo; j < hi; ++j) keep[j - j0] = words[j & 3][(j >> 2) - g0] >= threshold;
#endif
  }
}

}  // namespace pyattn::cpu
