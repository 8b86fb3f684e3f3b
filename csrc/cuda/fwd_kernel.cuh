// Forward: one CTA per (query block, head, batch); warp w owns query rows [16w, 16w+16) of the block.
// Q stays in smem; K and V blocks stream through one buffer each: V(j) loads during S = Q K(j)^T and the
// softmax, K(j+1) during O += P V(j). Online softmax in the exp2 domain, all in registers. The same kernel
// serves KV caches (p.seqused_k): key rows come through key_row, which follows the page table when paged.
#pragma once
#include "cuda/scores.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/softmax.cuh"
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
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const ScoreMod<kBf16, kWindow> mod(p, s, b, h);

  const T* q = static_cast<const T*>(p.q) + row_offset(p.q_strides, s, s.q_row0, h, m0);
  const T* k = key_base<T>(p, p.k, p.k_strides, s, hk);
  const T* v = key_base<T>(p, p.v, p.v_strides, s, hk);
  // keys [n0, n0 + kN) of k or v (t: the tensor) -> smem
  auto load_keys = [&](T* smem, const T* base, const Strides4& st, const void* t, int n0, int cols) {
    load_tile_rows<kN, D, kThreads>(smem, [&](int r) { return key_row(p, base, st, s, b, n0 + r); }, s.len_k - n0,
                                    cols, t);
  };
  const int E = static_cast<int>(p.head_dim), Ev = static_cast<int>(p.head_dim_v);

  int j_lo, j_hi;
  key_range(p, s, m0, min(m0 + kM, s.len_q) - 1, j_lo, j_hi);
  const int n_first = j_lo / kN, n_last = j_hi < j_lo ? n_first - 1 : j_hi / kN;

  load_tile<kM, D, kThreads>(sQ, q, p.q_strides.row, s.len_q - m0, E, p.q);
  if (n_first <= n_last) load_keys(sK, k, p.k_strides, p.k, n_first * kN, E);
  cp_async_commit();

  float o[D / 8][4] = {};
  RowStats st;
  const int r_warp = warp * 16;

  for (int nb = n_first; nb <= n_last; ++nb) {
    const int n0 = nb * kN;
    cp_async_wait_all();
    __syncthreads();  // K(nb) landed; every warp finished reading V(nb-1)
    load_keys(sV, v, p.v_strides, p.v, n0, Ev);
    cp_async_commit();

    float sc[kN / 8][4] = {};
    gemm_abt<kBf16, D, kN / 8>(sc, sQ, r_warp, sK, 0);
    softmax_step(sc, o, st, mod, !mod.elementwise && n0 + kN <= s.len_k, m0 + r_warp + g, n0);

    cp_async_wait_all();
    __syncthreads();  // V(nb) landed; every warp finished reading K(nb)
    if (nb < n_last) {
      load_keys(sK, k, p.k_strides, p.k, n0 + kN, E);
      cp_async_commit();
    }
    gemm_pb<kBf16, D, kN / 16>(o, sc, sV, 0);
  }
  cp_async_wait_all();  // with no key block, Q's copy is still in flight
  store_out_lse<kBf16, D>(p, s, h, m0, r_warp, st, o);
}

}  // namespace pyattn::cuda
