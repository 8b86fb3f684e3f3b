// What the host API calls: one instantiation per (dtype, padded head dim, window) lives in csrc/cuda/inst/.
// Plain C++ (no CUDA headers beyond the stream type) so api.cpp compiles with the host compiler.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "params.h"

namespace pyattn::cuda {

// kWindow: causal or a sliding window (window_right >= 0 or window_left >= 0); kD: head dim padded to 64k.
template <bool kBf16, int kD, bool kWindow>
void run_fwd(const AttnParams& p, cudaStream_t stream);

// delta: fp32 scratch (B, Hq, rows) contiguous, rows = q.size(2).
template <bool kBf16, int kD, bool kWindow>
void run_bwd(const AttnBwdParams& p, float* delta, int64_t rows, cudaStream_t stream);

// sm_90a forward for head dims padded to 128 (TMA + wgmma). q_rows, k_rows, q_batch: the tensors' row and
// batch extents (packed rows when varlen). False when TMA cannot describe the tensors: use run_fwd then.
template <bool kBf16, bool kWindow>
bool run_fwd_sm90(const AttnParams& p, int64_t q_rows, int64_t k_rows, int64_t q_batch, cudaStream_t stream);

}  // namespace pyattn::cuda
