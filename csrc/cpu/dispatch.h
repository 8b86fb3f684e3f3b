// The CPU capability in use: the KernelTable of one pyattn._cpu_<capability> module, set from Python
// (pyattn/cpu_capability.py) through pyattn._C._set_cpu_kernels. Lives in pyattn._C.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "cpu/kernel.h"

namespace pyattn::cpu {

// Checks the table's abi; nullptr unsets.
void set_kernels(const KernelTable* table);
// The table in use; raises if none was set.
const KernelTable& kernels();
// Name of the capability in use, or "" when none is set.
const char* capability_in_use();
// explain(): how the kernels in use would run fwd / kvcache_fwd (csrc/ops.cpp) with these, the op's own arguments,
// which fill the kernel's params as the op does (KernelTable::fwd_plan).
std::string explain_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                        const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                        int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                        int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                        const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& sinks,
                        const std::optional<at::Tensor>& block_states, const std::optional<at::Tensor>& block_bits,
                        int64_t block_q, int64_t block_k);
std::string explain_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seqlens_k, const std::optional<at::Tensor>& block_table,
                                const std::optional<at::Tensor>& cache_batch_idx,
                                const std::optional<at::Tensor>& cache_leftpad,
                                const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                                double scale, int64_t window_left, int64_t window_right, double softcap);
// For tests: the plan of the forward the kernels in use last ran on this thread, "" when none ran since the last
// call (KernelTable::take_last_fwd_run).
std::string last_fwd_run();

}  // namespace pyattn::cpu
