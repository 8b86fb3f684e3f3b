// Entry points of the fused CPU kernel, instantiated for float, double, BFloat16 and Half.
// Outputs are allocated and inputs validated by the host API (attention.cpp); these only compute.
#pragma once
#include <cstdint>

#include "params.h"

namespace pyattn::cpu {

// out, lse from q, k, v (+ mask, alibi, window, softcap, dropout).
template <typename scalar_t>
void run_fwd(const AttnParams& p);

// dq, dk, dv (+ dmask) from dout, out, lse. Deterministic for any thread count.
template <typename scalar_t>
void run_bwd(const AttnBwdParams& p);

// keep (B, H, L, S) contiguous: the dropout keep-mask that the kernels draw for (seed, offset).
void dropout_mask(bool* keep, int64_t B, int64_t H, int64_t L, int64_t S, float p, uint64_t seed,
                  uint64_t offset);

}  // namespace pyattn::cpu
