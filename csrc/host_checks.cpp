// The host checks of kernels launched from Python (pyattn/triton_ops.py), through pyattn._C: the compiled ops' own
// checks (host_params.h), run on a params struct that is then dropped, so that every backend's op refuses the same
// calls with the same messages under its own tag. The host is the caller's tag on q's device; as on the C++ hosts,
// values inside tensors are checked only when they live on the CPU.
#include "host_checks.h"

#include <optional>
#include <string>
#include <vector>

#include "host_params.h"

namespace pyattn {
namespace {

using Dtypes = std::vector<at::ScalarType>;

// fwd's checks (csrc/ops.cpp: its arguments); the kernels launched from Python loop over max_seqlen_q/k wherever they
// run, so those are checked on the CPU too. -> the kind of the mask (params.h MaskKind), which the kernels take.
int64_t check_fwd(const std::string& tag, const Dtypes& dtypes, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                  double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                  double dropout_p, const std::optional<at::Tensor>& rng_state,
                  const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_states,
                  const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  const Host host{tag.c_str(), q.device()};
  check_dtype(host, q, dtypes);
  AttnParams p;
  fill_params(host, p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right, bottom_right, softcap, dropout_p, sinks, block_states, block_bits, block_q,
              block_k);
  if (cu_seqlens_q.has_value()) check_max_seqlens(host, q.size(2), k.size(2), max_seqlen_q, max_seqlen_k);
  check_rng_state(host, rng_state, dropout_p);
  return p.mask_kind;
}

// bwd's checks: fwd's, then its gradient inputs'. -> the mask kind.
int64_t check_bwd(const std::string& tag, const Dtypes& dtypes, const at::Tensor& dout, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                  double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                  double dropout_p, const std::optional<at::Tensor>& rng_state, bool mask_grad,
                  const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_states,
                  const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  const int64_t kind = check_fwd(tag, dtypes, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, scale, window_left, window_right, bottom_right, softcap, dropout_p,
                                 rng_state, sinks, block_states, block_bits, block_q, block_k);
  check_bwd_inputs({tag.c_str(), q.device()}, dout, q, v, out, lse, dlse, cu_seqlens_q.has_value(), mask_grad);
  return kind;
}

// kvcache_fwd's checks. -> the mask kind (always none: kvcache_fwd takes no mask).
int64_t check_kvcache_fwd(const std::string& tag, const Dtypes& dtypes, const at::Tensor& q,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                          const std::optional<at::Tensor>& block_table,
                          const std::optional<at::Tensor>& cache_batch_idx,
                          const std::optional<at::Tensor>& cache_leftpad,
                          const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                          double scale, int64_t window_left, int64_t window_right, double softcap) {
  const Host host{tag.c_str(), q.device()};
  check_dtype(host, q, dtypes);
  AttnParams p;
  fill_kvcache_params(host, p, q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, cache_leftpad,
                      alibi_slopes, sinks, scale, window_left, window_right, softcap);
  return p.mask_kind;
}

}  // namespace

void def_host_checks(pybind11::module_& m) {
  // (tag, q's dtypes, then the op's arguments): each raises as the compiled op would, its messages under tag
  m.def("check_fwd", &check_fwd, "fwd's host checks for a kernel launched from Python -> the mask kind");
  m.def("check_bwd", &check_bwd, "bwd's host checks for a kernel launched from Python -> the mask kind");
  m.def("check_kvcache_fwd", &check_kvcache_fwd,
        "kvcache_fwd's host checks for a kernel launched from Python -> the mask kind (none)");
}

}  // namespace pyattn
