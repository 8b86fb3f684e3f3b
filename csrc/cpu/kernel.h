// Entry points of the fused CPU kernel. The kernel sources (setup.py's KERNEL_SOURCES) are compiled once
// per CPU capability into their own module, pyattn._cpu_<capability> (setup.py); each hands the host API a
// KernelTable, and the host API (attention.cpp, in pyattn._C) calls the one chosen at run time
// (pyattn/cpu_capability.py). Outputs are allocated and inputs validated by the host API; these only compute.
#pragma once
#include <cstdint>

#include "params.h"

namespace pyattn::cpu {

// out, lse from q, k, v (+ mask, alibi, window, softcap, dropout).
template <typename scalar_t>
void run_fwd(const AttnParams& p);

// explain(): how run_fwd runs p (its plan, cpu/fwd_plan.h); written to out as snprintf does (at most size bytes with
// the NUL), returning the full length.
template <typename scalar_t>
int64_t fwd_plan(const AttnParams& p, char* out, int64_t size);

// For tests: the plan of the forward that last ran on this thread, as fwd_plan writes it ("" when none ran since the
// last call, which clears it).
int64_t take_last_fwd_run(char* out, int64_t size);

// dq, dk, dv (+ dmask) from dout, out, lse. Deterministic for any thread count.
template <typename scalar_t>
void run_bwd(const AttnBwdParams& p);

// keep (B, H, L, S) contiguous: the dropout keep-mask that the kernels draw for (seed, offset).
void dropout_mask(bool* keep, int64_t B, int64_t H, int64_t L, int64_t S, float p, uint64_t seed,
                  uint64_t offset);

// Dtype slots of a KernelTable, in this order.
enum DtypeSlot { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kNumSlots = 4 };

// What one capability module provides. abi guards against a module built from other sources than _C.
struct KernelTable {
  static constexpr int64_t kVersion = 3;  // of this struct's fields: bump when they change
  static constexpr int64_t kAbi = 1000 * int64_t(sizeof(AttnBwdParams)) + 10 * kVersion + kNumSlots;
  int64_t abi;
  const char* capability;  // "avx2", ...
  void (*fwd[kNumSlots])(const AttnParams&);
  void (*bwd[kNumSlots])(const AttnBwdParams&);
  int64_t (*fwd_plan[kNumSlots])(const AttnParams& p, char* out, int64_t size);
  int64_t (*take_last_fwd_run)(char* out, int64_t size);
};

}  // namespace pyattn::cpu
