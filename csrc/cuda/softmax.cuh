// Online softmax over a 16-row score tile held in C fragments (mma.sync and wgmma share the layout), and
// the forward epilogue. Lane (g, t) holds rows g and g+8; statistics are in log2 units.
#pragma once
#include "cuda/scores.cuh"
#include "cuda/smem_tile.cuh"
#include "params.h"

namespace pyattn::cuda {

struct RowStats {
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g, g+8
  float l[2] = {0.f, 0.f};              // this lane's part of the running sum
};

// sc: raw q.k of a 16 x 8*kTiles tile whose lane-row g is query i0 and whose column 0 is key j0. Turns it
// into P = exp2(score - max) in place and rescales o and the stats to the new max. full: no element of the
// tile needs the score modifier (mod.elementwise off and every key inside the sequence).
template <int kTiles, int kOTiles, typename Mod>
__device__ __forceinline__ void softmax_step(float (&sc)[kTiles][4], float (&o)[kOTiles][4], RowStats& st,
                                             const Mod& mod, bool full, int i0, int j0) {
  const int t = threadIdx.x % 4;
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[n][e] = full ? sc[n][e] * mod.scale_log2 : mod(sc[n][e], i0 + (e / 2) * 8, j0 + n * 8 + 2 * t + (e & 1));
      mx[e / 2] = fmaxf(mx[e / 2], sc[n][e]);
    }
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(st.m[r], quad_max(mx[r]));
    m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far: exp2(-inf - 0) = 0, never NaN
    const float corr = exp2f(st.m[r] - m_use[r]);
    st.m[r] = m_new;
    st.l[r] *= corr;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      o[n][2 * r] *= corr;
      o[n][2 * r + 1] *= corr;
    }
  }
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[n][e] = exp2f(sc[n][e] - m_use[e / 2]);
      st.l[e / 2] += sc[n][e];
    }
}

// out = o / l and lse = m + log(l) (natural units) for the 16 rows starting at query m0 + r_warp of head h;
// rows that saw no key (l == 0) get out 0 and lse -inf. A sink (p.sinks, float32 (Hq,)) joins l with no value:
// l = l * 2^(m - m') + 2^(sink - m') at m' = max(m, sink), and o keeps the factor 2^(m - m') / l; a row with no
// key then gets out 0 and lse = sink. A NaN score made its P, so l and o, NaN (whatever fmaxf kept as the
// max): the tests below are written so that NaN reaches out and lse, and backward's P through lse.
template <bool kBf16, int D>
__device__ __forceinline__ void store_out_lse(const AttnParams& p, const Seq& s, int h, int m0, int r_warp,
                                              const RowStats& st, const float (&o)[D / 8][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t lse0 = s.batch * p.lse_strides.batch + h * p.lse_strides.head + s.q_row0 * p.lse_strides.row;
  const float sink = p.sinks ? static_cast<const float*>(p.sinks)[h] * kLog2e : -INFINITY;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = quad_sum(st.l[r]), m = st.m[r], keep = 1.f;
    if (sink != -INFINITY) {
      const float m_new = fmaxf(m, sink);
      keep = exp2f(m - m_new);  // 0 for a row with no key (m = -inf)
      l = l * keep + exp2f(sink - m_new);
      m = m_new;
    }
    inv[r] = l == 0.f ? 0.f : keep / l;
    const int i = m0 + r_warp + g + 8 * r;
    if (t == 0 && i < s.len_q) p.lse[lse0 + i * p.lse_strides.row] = l == 0.f ? -INFINITY : m * kLn2 + logf(l);
  }
  auto* out = static_cast<elem_t<kBf16>*>(p.out) + row_offset(p.out_strides, s, s.q_row0, h, m0);
  store_acc<kBf16, D>(out, p.out_strides.row, o, r_warp, s.len_q - m0, static_cast<int>(p.head_dim_v), inv);
}

}  // namespace pyattn::cuda
