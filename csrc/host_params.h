// Host-side checks and params filling shared by every host API (csrc/cpu, csrc/cuda, and csrc/host_checks.cpp for
// the kernels launched from Python): messages name the argument and its shape and start with the caller's tag
// ("pyattn cpu", "pyattn cuda", "pyattn triton").
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "params.h"

namespace pyattn {

struct Host {
  const char* tag;  // message prefix
  c10::Device device;  // every tensor argument must live here
};

Strides4 strides4(const at::Tensor& t);

void check_device(const Host& host, const at::Tensor& t, const char* name);

// q's dtype must be one of dtypes, the host's kernels' (named in the message as torch names them: float32, ...).
void check_dtype(const Host& host, const at::Tensor& q, c10::ArrayRef<at::ScalarType> dtypes);

// When dropout_p > 0: rng_state must be an int64 (seed, offset) on the host's device.
void check_rng_state(const Host& host, const std::optional<at::Tensor>& rng_state, double dropout_p);

// Varlen max_seqlen_q/k within the L and S packed rows: what kernels that loop over them need.
void check_max_seqlens(const Host& host, int64_t L, int64_t S, int64_t max_seqlen_q, int64_t max_seqlen_k);

// Validates the inputs shared by fwd and bwd (csrc/ops.cpp) and fills everything of p except the outputs and the
// dropout RNG state. Varlen lengths: read from cu_seqlens on CPU (and checked); on a GPU the caller's
// max_seqlen_q/k are trusted, as reading device memory here would synchronize. Likewise the block mask's states are
// checked against block_bits on the CPU only.
void fill_params(const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                 int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                 const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_states,
                 const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k);

// Validates kvcache_fwd's arguments (csrc/ops.cpp) and fills p for them, except the outputs. The values of
// seqlens_k, cache_leftpad, cache_batch_idx and block_table are checked against the cache when they live on the CPU;
// on a GPU reading them would synchronize, so there the caller (pyattn.kvcache_attention) has checked them.
void fill_kvcache_params(const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                         const std::optional<at::Tensor>& block_table,
                         const std::optional<at::Tensor>& cache_batch_idx,
                         const std::optional<at::Tensor>& cache_leftpad,
                         const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                         double scale, int64_t window_left, int64_t window_right, double softcap);

// kvcache_fwd's out (B, L, Hq, Ev) contiguous for q (B, L, Hq, E), lse (B, Hq, L) float32. Sets p.out, p.lse.
std::tuple<at::Tensor, at::Tensor> alloc_kvcache_out_lse(AttnParams& p, const at::Tensor& q,
                                                         const at::Tensor& v_cache);

// out (B, Hq, L, Ev) like q, lse (B, Hq, L) float32; varlen rows past the last sequence are never visited,
// so there they are allocated as the empty-row result (0, -inf). Sets p.out, p.lse.
std::tuple<at::Tensor, at::Tensor> alloc_out_lse(AttnParams& p, const at::Tensor& q, const at::Tensor& v,
                                                 bool varlen);

// Checks dout, out, lse, dlse against q (B, Hq, L, E) and v (B, Hkv, S, Ev); mask_grad must come without varlen.
void check_bwd_inputs(const Host& host, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                      bool varlen, bool mask_grad);

// check_bwd_inputs, then allocates dq, dk, dv (contiguous; zeros for varlen, whose padding rows get no gradient)
// and dmask (B, Hq, L, S) float32 when mask_grad, and sets them in p.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_bwd(
    const Host& host, AttnBwdParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    bool varlen, bool mask_grad);

}  // namespace pyattn
