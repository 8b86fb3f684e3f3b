// Backward, deterministic without atomics, in three kernels:
//   delta_kernel  delta = rowsum(dO * O) - dlse per query row (fp32 scratch shaped like lse, contiguous)
//   dkdv_kernel   one CTA per (key block, kv head, batch); warp w owns keys [16w, 16w+16) and walks every
//                 query block of every q head of its GQA group: dV += P^T dO, dK += dS^T Q
//   dq_kernel     one CTA per (query block, q head, batch); warp w owns 16 queries: dQ += dS K
// With scores t = softcap(scale * q.k) + bias, P = exp2(t2 - lse2), dP = dO V^T:
//   dS = dL/dt = P * (dP - delta), dL/d(q.k) = scale * cap_grad * dS; dmask = dS.
// Both GEMM kernels recompute S and dP: that is the price of writing dQ without atomics.
#pragma once
#include "cuda/scores.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tiles.h"
#include "params.h"

namespace pyattn::cuda {

// delta (B, Hq, rows) contiguous fp32, rows = q.size(2): packed like lse when varlen.
__device__ __forceinline__ int64_t delta_offset(const AttnBwdParams& p, const Seq& s, int h, int64_t rows) {
  return (s.batch * p.heads_q + h) * rows + s.q_row0;
}

// grid (ceil(L / kDeltaWarps), Hq, B), kDeltaWarps warps: one per query row.
template <bool kBf16>
__global__ void __launch_bounds__(256) delta_kernel(const AttnBwdParams p, float* delta, int64_t rows) {
  using T = elem_t<kBf16>;
  const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % 32;
  const int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const Seq s = seq_of(p, b);
  if (i >= s.len_q) return;
  const T* o = static_cast<const T*>(p.out) + row_offset(p.out_strides, s, s.q_row0, h, i);
  const T* dout = static_cast<const T*>(p.dout) + row_offset(p.dout_strides, s, s.q_row0, h, i);
  float acc = 0.f;
  for (int c = lane; c < p.head_dim_v; c += 32)
    acc += to_float<kBf16>(o[c * p.out_strides.col]) * to_float<kBf16>(dout[c * p.dout_strides.col]);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    const int64_t row = s.q_row0 + i;
    if (p.dlse) acc -= p.dlse[s.batch * p.dlse_strides.batch + h * p.dlse_strides.head + row * p.dlse_strides.row];
    delta[delta_offset(p, s, h, rows) + i] = acc;
  }
}

__device__ __forceinline__ int64_t lse_offset(const AttnParams& p, const Seq& s, int h) {
  return s.batch * p.lse_strides.batch + h * p.lse_strides.head + s.q_row0 * p.lse_strides.row;
}

// One warp's 16 keys against one query block: dV += P^T dO (kDV), dK += dS^T Q unscaled (kDK).
// Element (key j, query i) of the transposed score tiles: rows are keys, columns queries.
template <bool kBf16, int D, bool kWindow, bool kDV, bool kDK>
__device__ __forceinline__ void dkdv_body(const AttnBwdParams& p, const float* delta, int64_t rows,
                                          unsigned char* smem_raw) {
  using T = elem_t<kBf16>;
  using Tiles = BwdTiles<D>;
  constexpr int kN = Tiles::kDkvBlockN, kM = Tiles::kDkvBlockM, kThreads = Tiles::kDkvWarps * 32;
  constexpr int kParts = Tiles::kSplitDkv ? 2 : 1;
  T* sK = reinterpret_cast<T*>(smem_raw);  // [kN][D]
  T* sV = sK + kN * D;                       // [kN][D]
  T* sQ = sV + kN * D;                       // [kM][D]
  T* sdO = sQ + kM * D;                      // [kM][D]
  float* s_lse2 = reinterpret_cast<float*>(sdO + kM * D);  // [kM]
  float* s_delta = s_lse2 + kM;                             // [kM]

  const int hk = blockIdx.y, b = blockIdx.z;
  const Seq s = seq_of(p, b);
  const int j0 = (blockIdx.x / kParts) * kN;
  if (j0 >= s.len_k) return;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r_warp = warp * 16;
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);

  load_tile<kN, D, kThreads>(sK, static_cast<const T*>(p.k) + row_offset(p.k_strides, s, s.k_row0, hk, j0),
                             p.k_strides.row, s.len_k - j0, E, p.k);
  load_tile<kN, D, kThreads>(sV, static_cast<const T*>(p.v) + row_offset(p.v_strides, s, s.k_row0, hk, j0),
                             p.v_strides.row, s.len_k - j0, Ev, p.v);
  cp_async_commit();

  float dv[D / 8][4] = {}, dk[D / 8][4] = {};
  int i_lo, i_hi;
  query_range(p, s, j0, min(j0 + kN, s.len_k) - 1, i_lo, i_hi);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const ScoreMod<kBf16, kWindow> mod(p, s, b, h);
    const T* q = static_cast<const T*>(p.q) + row_offset(p.q_strides, s, s.q_row0, h, 0);
    const T* dout = static_cast<const T*>(p.dout) + row_offset(p.dout_strides, s, s.q_row0, h, 0);
    const float* lse = p.lse + lse_offset(p, s, h);
    const float* dl = delta + delta_offset(p, s, h, rows);
    for (int mb = i_lo / kM; i_lo <= i_hi && mb <= i_hi / kM; ++mb) {
      const int m0 = mb * kM;
      __syncthreads();  // every warp finished with the previous query block
      load_tile<kM, D, kThreads>(sQ, q + m0 * p.q_strides.row, p.q_strides.row, s.len_q - m0, E, p.q);
      load_tile<kM, D, kThreads>(sdO, dout + m0 * p.dout_strides.row, p.dout_strides.row, s.len_q - m0, Ev, p.dout);
      cp_async_commit();
      for (int r = threadIdx.x; r < kM; r += kThreads) {
        const bool valid = m0 + r < s.len_q;  // padding rows: P = 0
        s_lse2[r] = valid ? lse_log2(lse[(m0 + r) * p.lse_strides.row]) : INFINITY;
        s_delta[r] = valid ? dl[m0 + r] : 0.f;
      }
      cp_async_wait_all();
      __syncthreads();

      float st[kM / 8][4] = {}, dpt[kM / 8][4] = {};
      gemm_abt<kBf16, D, kM / 8>(st, sK, r_warp, sQ, 0);
      if constexpr (kDK) gemm_abt<kBf16, D, kM / 8>(dpt, sV, r_warp, sdO, 0);
#pragma unroll
      for (int n = 0; n < kM / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int il = n * 8 + 2 * t + (e & 1), i = m0 + il, j = j0 + r_warp + g + (e / 2) * 8;
          const float x = st[n][e];
          const float pr = exp2f(mod(x, i, j) - s_lse2[il]);
          if constexpr (kDK) {
            const float ds = pr * (dpt[n][e] - s_delta[il]);
            if (p.dmask && i < s.len_q && j < s.len_k)
              p.dmask[((b * p.heads_q + h) * p.seqlen_q + i) * p.seqlen_k + j] = ds;
            dpt[n][e] = ds * mod.cap_grad(x);
          }
          st[n][e] = pr;
        }
      if constexpr (kDV) gemm_pb<kBf16, D, kM / 16>(dv, st, sdO, 0);
      if constexpr (kDK) gemm_pb<kBf16, D, kM / 16>(dk, dpt, sQ, 0);
    }
  }
  cp_async_wait_all();  // with no query block, K and V are still in flight

  const float one[2] = {1.f, 1.f}, scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  if constexpr (kDV)
    store_acc<kBf16, D>(static_cast<T*>(p.dv) + row_offset(p.dv_strides, s, s.k_row0, hk, j0), p.dv_strides.row,
                        dv, r_warp, s.len_k - j0, Ev, one);
  if constexpr (kDK)
    store_acc<kBf16, D>(static_cast<T*>(p.dk) + row_offset(p.dk_strides, s, s.k_row0, hk, j0), p.dk_strides.row,
                        dk, r_warp, s.len_k - j0, E, scale);
}

// grid (ceil(S / kDkvBlockN) * (kSplitDkv ? 2 : 1), Hkv, B): with the split, even x computes dV, odd x dK.
template <bool kBf16, int D, bool kWindow>
__global__ void __launch_bounds__(BwdTiles<D>::kDkvWarps * 32)
    dkdv_kernel(const AttnBwdParams p, const float* delta, int64_t rows) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  if constexpr (!BwdTiles<D>::kSplitDkv) {
    dkdv_body<kBf16, D, kWindow, true, true>(p, delta, rows, smem_raw);
  } else if (blockIdx.x % 2 == 0) {
    dkdv_body<kBf16, D, kWindow, true, false>(p, delta, rows, smem_raw);
  } else {
    dkdv_body<kBf16, D, kWindow, false, true>(p, delta, rows, smem_raw);
  }
}

// grid (ceil(L / kDqBlockM), Hq, B): warp w owns queries [16w, 16w+16) of the block, walks its key blocks.
template <bool kBf16, int D, bool kWindow>
__global__ void __launch_bounds__(BwdTiles<D>::kDqWarps * 32)
    dq_kernel(const AttnBwdParams p, const float* delta, int64_t rows) {
  using T = elem_t<kBf16>;
  using Tiles = BwdTiles<D>;
  constexpr int kM = Tiles::kDqBlockM, kN = Tiles::kDqBlockN, kThreads = Tiles::kDqWarps * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kM][D]
  T* sdO = sQ + kM * D;                      // [kM][D]
  T* sK = sdO + kM * D;                      // [kN][D]
  T* sV = sK + kN * D;                       // [kN][D]

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq s = seq_of(p, b);
  const int m0 = blockIdx.x * kM;
  if (m0 >= s.len_q) return;
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r_warp = warp * 16;
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);
  const ScoreMod<kBf16, kWindow> mod(p, s, b, h);

  load_tile<kM, D, kThreads>(sQ, static_cast<const T*>(p.q) + row_offset(p.q_strides, s, s.q_row0, h, m0),
                             p.q_strides.row, s.len_q - m0, E, p.q);
  load_tile<kM, D, kThreads>(sdO, static_cast<const T*>(p.dout) + row_offset(p.dout_strides, s, s.q_row0, h, m0),
                             p.dout_strides.row, s.len_q - m0, Ev, p.dout);
  cp_async_commit();
  const T* k = static_cast<const T*>(p.k) + row_offset(p.k_strides, s, s.k_row0, hk, 0);
  const T* v = static_cast<const T*>(p.v) + row_offset(p.v_strides, s, s.k_row0, hk, 0);

  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + r_warp + g + 8 * r;
    const bool valid = i < s.len_q;
    lse2[r] = valid ? lse_log2(p.lse[lse_offset(p, s, h) + i * p.lse_strides.row]) : INFINITY;
    dl[r] = valid ? delta[delta_offset(p, s, h, rows) + i] : 0.f;
  }

  int j_lo, j_hi;
  key_range(p, s, m0, min(m0 + kM, s.len_q) - 1, j_lo, j_hi);
  const int n_first = j_lo / kN, n_last = j_hi < j_lo ? n_first - 1 : j_hi / kN;
  float dq[D / 8][4] = {};
  for (int nb = n_first; nb <= n_last; ++nb) {
    const int n0 = nb * kN;
    __syncthreads();  // every warp finished with the previous key block
    load_tile<kN, D, kThreads>(sK, k + n0 * p.k_strides.row, p.k_strides.row, s.len_k - n0, E, p.k);
    load_tile<kN, D, kThreads>(sV, v + n0 * p.v_strides.row, p.v_strides.row, s.len_k - n0, Ev, p.v);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    float sc[kN / 8][4] = {}, dp[kN / 8][4] = {};
    gemm_abt<kBf16, D, kN / 8>(sc, sQ, r_warp, sK, 0);
    gemm_abt<kBf16, D, kN / 8>(dp, sdO, r_warp, sV, 0);
#pragma unroll
    for (int n = 0; n < kN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + r_warp + g + (e / 2) * 8, j = n0 + n * 8 + 2 * t + (e & 1);
        const float x = sc[n][e];
        const float pr = exp2f(mod(x, i, j) - lse2[e / 2]);
        sc[n][e] = pr * (dp[n][e] - dl[e / 2]) * mod.cap_grad(x);
      }
    gemm_pb<kBf16, D, kN / 16>(dq, sc, sK, 0);
  }
  cp_async_wait_all();  // with no key block, Q and dO are still in flight

  const float scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  store_acc<kBf16, D>(static_cast<T*>(p.dq) + row_offset(p.dq_strides, s, s.q_row0, h, m0), p.dq_strides.row, dq,
                      r_warp, s.len_q - m0, E, scale);
}

}  // namespace pyattn::cuda
