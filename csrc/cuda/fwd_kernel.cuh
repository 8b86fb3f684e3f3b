// Forward: one CTA per (query block, head, batch); warp w owns query rows [16w, 16w+16) of the block.
// Q stays in smem; K and V blocks stream through one buffer each: V(j) loads during S = Q K(j)^T and the
// softmax, K(j+1) during O += P V(j). Online softmax in the exp2 domain, all in registers.
#pragma once
#include "cuda/scores.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tiles.h"
#include "params.h"

namespace pyattn::cuda {

template <bool kBf16, int D, bool kWindow>
__global__ void __launch_bounds__(FwdTiles<D>::kWarps * 32)
    fwd_kernel(const AttnParams p) {
  using T = elem_t<kBf16>;
  using Tiles = FwdTiles<D>;
  constexpr int kM = Tiles::kBlockM, kN = Tiles::kBlockN, kThreads = Tiles::kWarps * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kM][D]
  T* sK = sQ + kM * D;                       // [kN][D]
  T* sV = sK + kN * D;                       // [kN][D]

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Seq s = seq_of(p, b);
  const int m0 = m_block * kM;
  if (m0 >= s.len_q) return;  // varlen: this sequence is shorter than the longest
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const ScoreMod<kBf16, kWindow> mod(p, s, b, h);

  const T* q = static_cast<const T*>(p.q) + row_offset(p.q_strides, s, s.q_row0, h, m0);
  const T* k = static_cast<const T*>(p.k) + row_offset(p.k_strides, s, s.k_row0, hk, 0);
  const T* v = static_cast<const T*>(p.v) + row_offset(p.v_strides, s, s.k_row0, hk, 0);
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);

  int j_lo, j_hi;
  key_range(p, s, m0, min(m0 + kM, s.len_q) - 1, j_lo, j_hi);
  const int n_first = j_lo / kN, n_last = j_hi < j_lo ? n_first - 1 : j_hi / kN;

  load_tile<kM, D, kThreads>(sQ, q, p.q_strides.row, s.len_q - m0, E, p.q);
  if (n_first <= n_last)
    load_tile<kN, D, kThreads>(sK, k + n_first * kN * p.k_strides.row, p.k_strides.row, s.len_k - n_first * kN,
                               E, p.k);
  cp_async_commit();

  float o[D / 8][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g, g+8
  float l_i[2] = {0.f, 0.f};              // this lane's part of the running sum
  const int r_warp = warp * 16;

  for (int nb = n_first; nb <= n_last; ++nb) {
    const int n0 = nb * kN;
    cp_async_wait_all();
    __syncthreads();  // K(nb) landed; every warp finished reading V(nb-1)
    load_tile<kN, D, kThreads>(sV, v + n0 * p.v_strides.row, p.v_strides.row, s.len_k - n0, Ev, p.v);
    cp_async_commit();

    float sc[kN / 8][4] = {};
    gemm_abt<kBf16, D, kN / 8>(sc, sQ, r_warp, sK, 0);

    // scores -> log2 units, masked; row max over the block
    const bool full = !mod.elementwise && n0 + kN <= s.len_k;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + r_warp + g + (e / 2) * 8, j = n0 + n * 8 + 2 * t + (e & 1);
        sc[n][e] = full ? sc[n][e] * mod.scale_log2 : mod(sc[n][e], i, j);
        mx[e / 2] = fmaxf(mx[e / 2], sc[n][e]);
      }
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(mx[r]));
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far: exp2(-inf - 0) = 0, never NaN
      const float corr = exp2f(m_i[r] - m_use[r]);
      m_i[r] = m_new;
      l_i[r] *= corr;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
    }
#pragma unroll
    for (int n = 0; n < kN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[n][e] = exp2f(sc[n][e] - m_use[e / 2]);
        l_i[e / 2] += sc[n][e];
      }

    cp_async_wait_all();
    __syncthreads();  // V(nb) landed; every warp finished reading K(nb)
    if (nb < n_last) {
      load_tile<kN, D, kThreads>(sK, k + (n0 + kN) * p.k_strides.row, p.k_strides.row, s.len_k - n0 - kN, E, p.k);
      cp_async_commit();
    }
    gemm_pb<kBf16, D, kN / 16>(o, sc, sV, 0);
  }
  cp_async_wait_all();  // with no key block, Q's copy is still in flight

  // out = o / l; lse = m + log(l) in natural units; rows that saw no key: out 0, lse -inf
  float inv[2];
  const int64_t lse_row0 = s.batch * p.lse_strides.batch + h * p.lse_strides.head + s.q_row0 * p.lse_strides.row;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_i[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int i = m0 + r_warp + g + 8 * r;
    if (t == 0 && i < s.len_q)
      p.lse[lse_row0 + i * p.lse_strides.row] = l > 0.f ? m_i[r] * kLn2 + logf(l) : -INFINITY;
  }
  T* out = static_cast<T*>(p.out) + row_offset(p.out_strides, s, s.q_row0, h, m0);
  store_acc<kBf16, D>(out, p.out_strides.row, o, r_warp, s.len_q - m0, Ev, inv);
}

}  // namespace pyattn::cuda
