// Host-side checks and params filling shared by every device's host API (csrc/cpu, csrc/cuda): messages
// name the argument and its shape and start with the caller's tag ("pyattn cpu", "pyattn cuda").
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

// Validates the inputs shared by fwd and bwd and fills everything of p except the outputs and the dropout
// RNG state. Varlen lengths: read from cu_seqlens on CPU (and checked); on a GPU the caller's
// max_seqlen_q/k are trusted, as reading device memory here would synchronize.
void fill_params(const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                 int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                 const std::optional<at::Tensor>& sinks);

// Validates kvcache_fwd's arguments (csrc/ops.cpp) and fills p for them, outputs included: out (B, L, Hq, Ev)
// like q, lse (B, Hq, L) float32. The values of seqlens_k, cache_leftpad, cache_batch_idx and block_table are
// checked against the cache when they live on the CPU; on a GPU reading them would synchronize, so there the
// caller (pyattn.kvcache_attention) has checked them.
std::tuple<at::Tensor, at::Tensor> fill_kvcache_params(
    const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& seqlens_k, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks, double scale,
    int64_t window_left, int64_t window_right, double softcap);

// out (B, Hq, L, Ev) like q, lse (B, Hq, L) float32; varlen rows past the last sequence are never visited,
// so there they are allocated as the empty-row result (0, -inf). Sets p.out, p.lse.
std::tuple<at::Tensor, at::Tensor> alloc_out_lse(AttnParams& p, const at::Tensor& q, const at::Tensor& v,
                                                 bool varlen);

// Checks dout, out, lse, dlse against q/v, allocates dq, dk, dv (contiguous; zeros for varlen, whose
// padding rows get no gradient) and dmask (B, Hq, L, S) float32 when mask_grad, and sets them in p.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_bwd(
    const Host& host, AttnBwdParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    bool varlen, bool mask_grad);

}  // namespace pyattn
