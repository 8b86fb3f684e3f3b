// Launch: grids from tiles.h, dynamic shared memory above the 48 KiB default opted in per kernel.
#pragma once
#include "cuda/bwd_kernel.cuh"
#include "cuda/dispatch.h"
#include "cuda/fwd_kernel.cuh"

namespace pyattn::cuda {

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <bool kBf16, int kD, bool kWindow>
void run_fwd(const AttnParams& p, cudaStream_t stream) {
  using Tiles = FwdTiles<kD>;
  auto kernel = fwd_kernel<kBf16, kD, kWindow>;
  allow_smem(kernel, Tiles::kSmem);
  const dim3 grid(ceil_div(p.seqlen_q, Tiles::kBlockM), p.heads_q, p.batch);
  kernel<<<grid, Tiles::kWarps * 32, Tiles::kSmem, stream>>>(p);
}

template <bool kBf16, int kD, bool kWindow>
void run_bwd(const AttnBwdParams& p, float* delta, int64_t rows, cudaStream_t stream) {
  using Tiles = BwdTiles<kD>;
  delta_kernel<kBf16><<<dim3(ceil_div(p.seqlen_q, Tiles::kDeltaWarps), p.heads_q, p.batch), Tiles::kDeltaWarps * 32,
                        0, stream>>>(p, delta, rows);
  auto dkdv = dkdv_kernel<kBf16, kD, kWindow>;
  allow_smem(dkdv, Tiles::kDkvSmem);
  const unsigned parts = Tiles::kSplitDkv ? 2 : 1;
  dkdv<<<dim3(ceil_div(p.seqlen_k, Tiles::kDkvBlockN) * parts, p.heads_kv, p.batch), Tiles::kDkvWarps * 32,
         Tiles::kDkvSmem, stream>>>(p, delta, rows);
  auto dq = dq_kernel<kBf16, kD, kWindow>;
  allow_smem(dq, Tiles::kDqSmem);
  dq<<<dim3(ceil_div(p.seqlen_q, Tiles::kDqBlockM), p.heads_q, p.batch), Tiles::kDqWarps * 32, Tiles::kDqSmem,
       stream>>>(p, delta, rows);
}

}  // namespace pyattn::cuda
