// Forward for sm_90a (head dim padded to 128): TMA loads, wgmma, producer/consumer warp specialization.
// One CTA per (128-query block, head, batch), three warpgroups: warpgroup 0 produces (one thread issues the
// TMA loads of Q once and of K and V per key block into a two-stage ring), warpgroups 1 and 2 consume, 64
// query rows each: S = Q K^T with both operands in smem, the online softmax in registers (softmax.cuh, as on
// sm_80), O += P V with P from registers. mbarriers hand the stages over: kv_full (TMA bytes landed) and
// kv_empty (every consumer thread done with the stage).
#pragma once
#include <cuda.h>

#include "cuda/scores.cuh"
#include "cuda/sm90.cuh"
#include "cuda/softmax.cuh"
#include "cuda/tiles.h"
#include "params.h"

namespace pyattn::cuda {

template <bool kBf16, bool kWindow>
__global__ void __launch_bounds__(Sm90Tiles::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ CUtensorMap tq,
                    const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tiles = Sm90Tiles;
  constexpr int kM = Tiles::kBlockM, kN = Tiles::kBlockN, kStages = Tiles::kStages;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  unsigned char* sQ = base;
  auto sK = [&](int stage) { return base + (1 + stage) * Tiles::kTileBytes; };
  auto sV = [&](int stage) { return base + (1 + kStages + stage) * Tiles::kTileBytes; };
  uint64_t* bars = reinterpret_cast<uint64_t*>(base + (1 + 2 * kStages) * Tiles::kTileBytes);
  uint64_t* q_full = bars;
  uint64_t* kv_full = bars + 1;              // [kStages]
  uint64_t* kv_empty = bars + 1 + kStages;   // [kStages]

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Seq s = seq_of(p, b);
  const int m0 = m_block * kM;
  if (m0 >= s.len_q) return;
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  int j_lo, j_hi;
  key_range(p, s, m0, min(m0 + kM, s.len_q) - 1, j_lo, j_hi);
  const int n_first = j_lo / kN, n_blocks = j_hi < j_lo ? 0 : j_hi / kN - n_first + 1;

  if (threadIdx.x == 0) {
    sm90::mbar_init(q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      sm90::mbar_init(&kv_full[i], 1);
      sm90::mbar_init(&kv_empty[i], 2 * 128);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  // TMA rows: packed rows when varlen (batch coordinate 0), else rows of batch b
  const int q_row = static_cast<int>(s.q_row0) + m0, k_row = static_cast<int>(s.k_row0);
  const int batch = static_cast<int>(s.batch);
  if (wg == 0) {
    sm90::regs_dec<40>();
    if (threadIdx.x == 0) {
      sm90::mbar_arrive_expect_tx(q_full, Tiles::kTileBytes);
      for (int cb = 0; cb < 2; ++cb) sm90::tma_load_4d(sQ + cb * Tiles::kBoxBytes, &tq, q_full, cb * 64, q_row, h, batch);
      for (int it = 0; it < n_blocks; ++it) {
        const int stage = it % kStages, n0 = (n_first + it) * kN;
        if (it >= kStages) sm90::mbar_wait(&kv_empty[stage], ((it / kStages) & 1) ^ 1);
        sm90::mbar_arrive_expect_tx(&kv_full[stage], 2 * Tiles::kTileBytes);
        for (int cb = 0; cb < 2; ++cb) {
          sm90::tma_load_4d(sK(stage) + cb * Tiles::kBoxBytes, &tk, &kv_full[stage], cb * 64, k_row + n0, hk, batch);
          sm90::tma_load_4d(sV(stage) + cb * Tiles::kBoxBytes, &tv, &kv_full[stage], cb * 64, k_row + n0, hk, batch);
        }
      }
    }
    return;
  }

  sm90::regs_inc<232>();
  const ScoreMod<kBf16, kWindow> mod(p, s, b, h);
  const int cwg = wg - 1;                                    // consumer warpgroup: query rows [64 cwg, 64 cwg + 64)
  const int r_warp = cwg * 64 + (threadIdx.x / 32 % 4) * 16;  // this warp's 16 rows within the block
  const int g = threadIdx.x % 32 / 4;
  float o[16][4] = {};
  RowStats st;
  sm90::mbar_wait(q_full, 0);
  for (int it = 0; it < n_blocks; ++it) {
    const int stage = it % kStages, n0 = (n_first + it) * kN;
    sm90::mbar_wait(&kv_full[stage], (it / kStages) & 1);

    // S (64 x 128) = Q (this warpgroup's 64 rows, K-major) K^T (K-major), 8 k16 steps over the head dim
    float sc[16][4] = {};
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Tiles::kD / 16; ++kk) {
      const int cb = kk / 4, off = (kk % 4) * 32;
      sm90::wgmma_ss<kBf16>(sc, sm90::desc(sQ + cb * Tiles::kBoxBytes + cwg * 64 * 128 + off, 16, 1024),
                            sm90::desc(sK(stage) + cb * Tiles::kBoxBytes + off, 16, 1024));
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait_all();

    softmax_step(sc, o, st, mod, !mod.elementwise && n0 + kN <= s.len_k, m0 + r_warp + g, n0);

    // O (64 x 128) += P (registers, 64 x 128 keys) V (MN-major: rows are keys), 8 k16 steps over the keys
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint32_t a[4] = {pack2<kBf16>(sc[2 * kk][0], sc[2 * kk][1]), pack2<kBf16>(sc[2 * kk][2], sc[2 * kk][3]),
                             pack2<kBf16>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                             pack2<kBf16>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
      sm90::wgmma_rs<kBf16>(o, a, sm90::desc(sV(stage) + kk * 16 * 128, Tiles::kBoxBytes, 1024));
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait_all();
    sm90::mbar_arrive(&kv_empty[stage]);
  }
  store_out_lse<kBf16, Tiles::kD>(p, s, h, m0, r_warp, st, o);
#endif
}

}  // namespace pyattn::cuda
