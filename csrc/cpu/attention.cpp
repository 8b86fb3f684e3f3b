// Host API of the fused CPU kernel: dtype and RNG checks, the shared checks and allocation of
// host_params.h, dispatch to the kernels of the CPU capability in use (dispatch.h) by dtype. Registers
// pyattn::fwd, bwd, kvcache_fwd and cpu_dropout_mask for CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/dispatch.h"
#include "host_params.h"

namespace pyattn::cpu {

namespace {
std::atomic<const KernelTable*> g_kernels{nullptr};
}  // namespace

void set_kernels(const KernelTable* table) {
  TORCH_CHECK(table == nullptr || table->abi == KernelTable::kAbi, "pyattn cpu: the kernel module for capability ",
              table == nullptr ? "" : table->capability, " was built from other sources than pyattn._C (abi ",
              table == nullptr ? 0 : table->abi, " != ", KernelTable::kAbi, "); rebuild pyattn");
  g_kernels.store(table);
}

const KernelTable& kernels() {
  const KernelTable* table = g_kernels.load();
  TORCH_CHECK(table != nullptr, "pyattn cpu: no CPU kernel module is loaded (pyattn.cpu_capability.use())");
  return *table;
}

const char* capability_in_use() {
  const KernelTable* table = g_kernels.load();
  return table == nullptr ? "" : table->capability;
}

namespace {

DtypeSlot slot(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    default: return kFloat16;  // check_dtype admitted only these four
  }
}

const Host kHost{"pyattn cpu", c10::Device(c10::kCPU)};

void check_dtype(const at::Tensor& q) {
  pyattn::check_dtype(kHost, q, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
}

// Until the kernel implements block-sparse masks: refused, never ignored.
void refuse_block_mask(const AttnParams& p) {
  TORCH_CHECK(p.block_states == nullptr, kHost.tag, ": block_states (a block-sparse mask) is not supported yet");
}

void set_rng(AttnParams& p, const std::optional<at::Tensor>& rng_state) {
  check_rng_state(kHost, rng_state, p.dropout_p);
  if (p.dropout_p == 0) return;
  const at::Tensor r = rng_state->contiguous();
  p.seed = uint64_t(r.data_ptr<int64_t>()[0]);
  p.offset = uint64_t(r.data_ptr<int64_t>()[1]);
}

// q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) -> out (B, Hq, L, Ev), lse (B, Hq, L) float32
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, double scale, int64_t window_left,
                                       int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                                       const std::optional<at::Tensor>& rng_state,
                                       const std::optional<at::Tensor>& sinks,
                                       const std::optional<at::Tensor>& block_states,
                                       const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  check_dtype(q);
  AttnParams p;
  fill_params(kHost, p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right, bottom_right, softcap, dropout_p, sinks, block_states, block_bits, block_q,
              block_k);
  refuse_block_mask(p);
  set_rng(p, rng_state);
  auto [out, lse] = alloc_out_lse(p, q, v, cu_seqlens_q.has_value());
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  kernels().fwd[slot(q.scalar_type())](p);
  return {out, lse};
}

// Gradients of fwd: dq, dk, dv like q, k, v (contiguous); dmask (B, Hq, L, S) float32 if mask_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& rng_state, bool mask_grad, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& block_states, const std::optional<at::Tensor>& block_bits, int64_t block_q,
    int64_t block_k) {
  check_dtype(q);
  AttnBwdParams p;
  fill_params(kHost, p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right, bottom_right, softcap, dropout_p, sinks, block_states, block_bits, block_q,
              block_k);
  refuse_block_mask(p);
  set_rng(p, rng_state);
  auto [dq, dk, dv, dmask] =
      prepare_bwd(kHost, p, dout, q, k, v, out, lse, dlse, cu_seqlens_q.has_value(), mask_grad);
  if (q.numel() + k.numel() + v.numel() == 0) return {dq, dk, dv, dmask};
  kernels().bwd[slot(q.scalar_type())](p);
  return {dq, dk, dv, dmask};
}

// q (B, L, Hq, E) over a KV cache (csrc/ops.cpp) -> out (B, L, Hq, Ev), lse (B, Hq, L) float32
std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                               const std::optional<at::Tensor>& block_table,
                                               const std::optional<at::Tensor>& cache_batch_idx,
                                               const std::optional<at::Tensor>& cache_leftpad,
                                               const std::optional<at::Tensor>& alibi_slopes,
                                               const std::optional<at::Tensor>& sinks, double scale,
                                               int64_t window_left, int64_t window_right, double softcap) {
  check_dtype(q);
  AttnParams p;
  fill_kvcache_params(kHost, p, q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, cache_leftpad,
                      alibi_slopes, sinks, scale, window_left, window_right, softcap);
  auto [out, lse] = alloc_kvcache_out_lse(p, q, v_cache);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  kernels().fwd[slot(q.scalar_type())](p);
  return {out, lse};
}

// (B, H, L, S) bool: the keep-mask the kernels draw for (seed, offset).
at::Tensor cpu_dropout_mask(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double dropout_p,
                            int64_t seed, int64_t offset) {
  TORCH_CHECK(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
              "pyattn cpu_dropout_mask: sizes must be >= 0, got (", batch, ", ", heads, ", ", seqlen_q, ", ",
              seqlen_k, ")");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "pyattn cpu_dropout_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  at::Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, at::kBool);
  if (dropout_p == 0) return keep.fill_(true);
  if (keep.numel() > 0)
    dropout_mask(keep.data_ptr<bool>(), batch, heads, seqlen_q, seqlen_k, float(dropout_p), uint64_t(seed),
                 uint64_t(offset));
  return keep;
}

}  // namespace

namespace {

std::string plan_text(const AttnParams& p, at::ScalarType dtype) {
  char text[512];
  kernels().fwd_plan[slot(dtype)](p, text, sizeof(text));
  return text;
}

}  // namespace

std::string explain_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                        const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                        int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                        int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                        const std::optional<at::Tensor>& /*rng_state: no part of the plan*/,
                        const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_states,
                        const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  check_dtype(q);
  AttnParams p;
  fill_params(kHost, p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right, bottom_right, softcap, dropout_p, sinks, block_states, block_bits, block_q,
              block_k);
  refuse_block_mask(p);
  return plan_text(p, q.scalar_type());
}

std::string explain_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& seqlens_k, const std::optional<at::Tensor>& block_table,
                                const std::optional<at::Tensor>& cache_batch_idx,
                                const std::optional<at::Tensor>& cache_leftpad,
                                const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                                double scale, int64_t window_left, int64_t window_right, double softcap) {
  check_dtype(q);
  AttnParams p;
  fill_kvcache_params(kHost, p, q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, cache_leftpad,
                      alibi_slopes, sinks, scale, window_left, window_right, softcap);
  return plan_text(p, q.scalar_type());
}

std::string last_fwd_run() {
  char text[512];
  kernels().take_last_fwd_run(text, sizeof(text));
  return text;
}

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
  m.impl("kvcache_fwd", &kvcache_fwd);
}

// No tensor arguments, so no dispatch key to select CPU: registered for every backend.
TORCH_LIBRARY_IMPL(pyattn, CompositeExplicitAutograd, m) {
  m.impl("cpu_dropout_mask", &cpu_dropout_mask);
}

}  // namespace pyattn::cpu
