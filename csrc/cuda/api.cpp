// Host API of the CUDA kernels: checks (messages name the argument and its shape), device guard, the
// current stream, allocation, and the choice of instantiation (dtype x padded head dim x window).
// Registers pyattn::fwd, bwd and kvcache_fwd for CUDA. Compiled only in CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda/dispatch.h"
#include "host_params.h"

namespace pyattn::cuda {
namespace {

constexpr int kMaxHeadDim = 256;

Host host_of(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "pyattn cuda: q must be a CUDA tensor, got ", q.device());
  return {"pyattn cuda", q.device()};
}

// The kernels copy rows with 16-byte cp.async: unit column stride, other strides multiples of 8 elements,
// a 16-byte aligned start. Anything else is copied once into a fresh (aligned) contiguous tensor.
at::Tensor aligned(const at::Tensor& t) {
  bool ok = t.dim() == 4 && t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; ok && d < 3; ++d) ok = t.stride(d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

struct Choice {
  int head_dim;  // padded: 64, 128, 192 or 256
  bool sm90;     // the TMA + wgmma forward applies (it may still decline: run_fwd_sm90 returns false)
};

// The sm_90a forward runs on compute capability 9.0 when this build has an sm_90a image and head dims pad
// to 128. PYATTN_CUDA_SM90=0 keeps Hopper on the sm_80 path (to compare the two).
bool use_sm90(int major, int minor, int head_dim) {
  static const bool built = std::string(PYATTN_CUDA_ARCHS).find("9.0a") != std::string::npos;
  const char* env = std::getenv("PYATTN_CUDA_SM90");  // read per call: tests switch it
  return built && (env == nullptr || std::string(env) != "0") && major == 9 && minor == 0 && head_dim == 128;
}

// Checks what only these kernels require; picks the instantiation to run.
Choice check_kernel_limits(const AttnParams& p, const at::Tensor& q, double dropout_p) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "pyattn cuda: q must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(dropout_p == 0, "pyattn cuda: dropout is not supported (dropout_p = ", dropout_p, ")");
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, "pyattn cuda: needs compute capability 8.0 or newer (bf16 mma.sync), got ", major, ".x");
  const int64_t E = p.head_dim, Ev = p.head_dim_v;
  TORCH_CHECK(E % 8 == 0 && Ev % 8 == 0 && E > 0 && Ev > 0 && std::max(E, Ev) <= kMaxHeadDim,
              "pyattn cuda: head dims of q (E = ", E, ") and v (Ev = ", Ev, ") must be multiples of 8 in [8, ",
              kMaxHeadDim, "]");
  TORCH_CHECK(p.heads_q <= 65535 && p.heads_kv <= 65535 && p.batch <= 65535, "pyattn cuda: q ", q.sizes(),
              ": at most 65535 heads and batch entries (grid y and z)");
  const int d = static_cast<int>((std::max(E, Ev) + 63) / 64 * 64);
  return {d, use_sm90(major, minor, d)};
}

// Calls f(bf16, D, window) with compile-time constants for the runtime choice.
template <typename F>
void with_instantiation(bool bf16, int d, bool window, F&& f) {
  auto by_dim = [&](auto b, auto w) {
    switch (d) {
      case 64: return f(b, std::integral_constant<int, 64>{}, w);
      case 128: return f(b, std::integral_constant<int, 128>{}, w);
      case 192: return f(b, std::integral_constant<int, 192>{}, w);
      default: return f(b, std::integral_constant<int, 256>{}, w);
    }
  };
  auto by_window = [&](auto b) {
    return window ? by_dim(b, std::true_type{}) : by_dim(b, std::false_type{});
  };
  return bf16 ? by_window(std::true_type{}) : by_window(std::false_type{});
}

// The CUDA kernels take no block-sparse mask: refused, never ignored (the Triton and CPU kernels take it).
void refuse_block_mask(const Host& host, const AttnParams& p) {
  TORCH_CHECK(p.block_states == nullptr, host.tag, ": block_states (a block-sparse mask) is not supported by the "
              "CUDA C++ kernels");
}

bool uses_window(const AttnParams& p) { return p.window_left >= 0 || p.window_right >= 0; }

// q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) -> out (B, Hq, L, Ev), lse (B, Hq, L) float32
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, double scale, int64_t window_left,
                                       int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                                       const std::optional<at::Tensor>& /*rng_state: no dropout here*/,
                                       const std::optional<at::Tensor>& sinks,
                                       const std::optional<at::Tensor>& block_states,
                                       const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  const Host host = host_of(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  AttnParams p;
  fill_params(host, p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right, bottom_right, softcap, dropout_p, sinks, block_states, block_bits, block_q,
              block_k);
  refuse_block_mask(host, p);
  const Choice choice = check_kernel_limits(p, q, dropout_p);
  auto [out, lse] = alloc_out_lse(p, q, v, cu_seqlens_q.has_value());
  if (out.numel() == 0 || p.batch == 0 || p.seqlen_q == 0) return {out, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_instantiation(q.scalar_type() == at::kBFloat16, choice.head_dim, uses_window(p), [&](auto b, auto dim, auto w) {
    constexpr bool kBf16 = decltype(b)::value, kWindow = decltype(w)::value;
    if constexpr (decltype(dim)::value == 128) {
      if (choice.sm90 && run_fwd_sm90<kBf16, kWindow>(p, q.size(2), k.size(2), q.size(0), stream)) return;
    }
    run_fwd<kBf16, decltype(dim)::value, kWindow>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// Decoding (one query per sequence) with GQA: the G = Hq / Hkv query heads that share a kv head become G rows
// of one head, as FlashAttention does (seqlenq_ngroups_swapped), so a 128-row block holds G real rows, not 1,
// and K/V are read once per kv head. A lone query sits at the last position and sees every key (the right
// window and causality are moot), unless a left window or a per-q-head term (ALiBi, sinks) applies.
void pack_gqa_decode(AttnParams& p) {
  const int64_t G = p.heads_q / p.heads_kv;
  if (p.seqlen_q != 1 || G == 1 || p.window_left >= 0 || p.alibi_slopes != nullptr || p.sinks != nullptr) return;
  // q, out (B, Hq, 1, D) and lse (B, Hq, 1) seen as (B, Hkv, G, D) and (B, Hkv, G): row g of head hk is q head
  // hk * G + g
  for (Strides4* st : {&p.q_strides, &p.out_strides, &p.lse_strides}) {
    st->row = st->head;
    st->head *= G;
  }
  p.seqlen_q = G;
  p.heads_q = p.heads_kv;
  p.window_right = -1;
}

// q (B, L, Hq, E), caches (B_cache, S_max, Hkv, E|Ev) or paged (num_pages, page_size, Hkv, E|Ev) with
// block_table (B, max_pages) -> out (B, L, Hq, Ev), lse (B, Hq, L) float32. The sm_80 forward in KV-cache mode
// (csrc/params.h): per-sequence key ranges, cache rows and pages are read on the device, so the sm_90a (TMA)
// forward, whose boxes need evenly strided rows, does not take it. The values of seqlens_k, cache_leftpad,
// cache_batch_idx and block_table are the caller's to check (pyattn.kvcache_attention does).
std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                               const at::Tensor& v_cache_in, const at::Tensor& seqlens_k,
                                               const std::optional<at::Tensor>& block_table,
                                               const std::optional<at::Tensor>& cache_batch_idx,
                                               const std::optional<at::Tensor>& cache_leftpad,
                                               const std::optional<at::Tensor>& alibi_slopes,
                                               const std::optional<at::Tensor>& sinks, double scale,
                                               int64_t window_left, int64_t window_right, double softcap) {
  const Host host = host_of(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  // (B, L, H, D) tensors: aligned() checks the same 16-byte rule on any 4-D layout
  const at::Tensor q = aligned(q_in), k_cache = aligned(k_cache_in), v_cache = aligned(v_cache_in);
  AttnParams p;
  fill_kvcache_params(host, p, q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, cache_leftpad,
                      alibi_slopes, sinks, scale, window_left, window_right, softcap);
  const Choice choice = check_kernel_limits(p, q, 0.0);
  auto [out, lse] = alloc_kvcache_out_lse(p, q, v_cache);
  if (out.numel() == 0 || p.batch == 0 || p.seqlen_q == 0) return {out, lse};
  pack_gqa_decode(p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_instantiation(q.scalar_type() == at::kBFloat16, choice.head_dim, uses_window(p), [&](auto b, auto dim, auto w) {
    run_fwd<decltype(b)::value, decltype(dim)::value, decltype(w)::value>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// Gradients of fwd: dq, dk, dv like q, k, v (contiguous); dmask (B, Hq, L, S) float32 if mask_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double softcap, double dropout_p, const std::optional<at::Tensor>& /*rng_state*/,
    bool mask_grad, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_states,
    const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  const Host host = host_of(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), dout = aligned(dout_in);
  AttnBwdParams p;
  fill_params(host, p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right, bottom_right, softcap, dropout_p, sinks, block_states, block_bits, block_q,
              block_k);
  refuse_block_mask(host, p);
  const int d = check_kernel_limits(p, q, dropout_p).head_dim;
  auto [dq, dk, dv, dmask] =
      prepare_bwd(host, p, dout, q, k, v, out, lse, dlse, cu_seqlens_q.has_value(), mask_grad);
  if (q.numel() + k.numel() + v.numel() == 0 || p.batch == 0) return {dq, dk, dv, dmask};
  // Empty sides still need the other side's gradients: zeros (no key: dq = 0; no query: dk = dv = 0).
  if (p.seqlen_q == 0 || p.seqlen_k == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dmask};
  const int64_t rows = q.size(2);
  at::Tensor delta = at::empty({q.size(0), q.size(1), rows}, q.options().dtype(at::kFloat));  // rowsum(dO * O)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_instantiation(q.scalar_type() == at::kBFloat16, d, uses_window(p), [&](auto b, auto dim, auto w) {
    run_bwd<decltype(b)::value, decltype(dim)::value, decltype(w)::value>(p, delta.data_ptr<float>(), rows, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
  m.impl("kvcache_fwd", &kvcache_fwd);
}

}  // namespace pyattn::cuda
