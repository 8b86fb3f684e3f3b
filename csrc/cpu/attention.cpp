// Host API of the fused CPU kernel: checks (messages name the argument and its shape), output
// allocation, params filling, dtype dispatch. Registers pyattn::fwd, bwd and cpu_dropout_mask for CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cpu/kernel.h"
#include "params.h"

namespace pyattn::cpu {
namespace {

Strides4 strides4(const at::Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), t.stride(1), t.stride(2), 0};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pyattn cpu: ", name, " must be a CPU tensor, got ", t.device());
}

// Validates the inputs shared by fwd and bwd and fills everything of p except the outputs.
void fill_params(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                 double dropout_p, const std::optional<at::Tensor>& rng_state) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->dim() == 4, "pyattn cpu: ", name, " must be 4-D (B, H, seq, dim), got shape ", t->sizes());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "pyattn cpu: q must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "pyattn cpu: q, k, v must share a dtype, got ",
              dt, ", ", k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "pyattn cpu: batch of q ", q.sizes(), ", k ", k.sizes(),
              " and v ", v.sizes(), " differ");
  TORCH_CHECK(k.size(3) == E, "pyattn cpu: head dim of q ", q.sizes(), " and k ", k.sizes(), " differ");
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, "pyattn cpu: k ", k.sizes(), " and v ", v.sizes(),
              " must have the same heads and length");
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "pyattn cpu: heads of q ", q.sizes(),
              " must be a multiple of heads of k ", k.sizes());
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "pyattn cpu: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(softcap >= 0, "pyattn cpu: softcap must be >= 0 (0 = off), got ", softcap);

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides4(q);
  p.k_strides = strides4(k);
  p.v_strides = strides4(v);
  p.batch = B;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.seqlen_q = L;
  p.seqlen_k = S;
  p.head_dim = E;
  p.head_dim_v = Ev;
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  p.dropout_p = dropout_p;
  if (dropout_p > 0) {
    TORCH_CHECK(rng_state.has_value(), "pyattn cpu: dropout_p > 0 needs rng_state (seed, offset)");
    const at::Tensor& rng = *rng_state;
    check_cpu(rng, "rng_state");
    TORCH_CHECK(rng.scalar_type() == at::kLong && rng.numel() == 2,
                "pyattn cpu: rng_state must be int64 (seed, offset) of 2 elements, got ", rng.scalar_type(),
                " of shape ", rng.sizes());
    const at::Tensor r = rng.contiguous();
    p.seed = uint64_t(r.data_ptr<int64_t>()[0]);
    p.offset = uint64_t(r.data_ptr<int64_t>()[1]);
  }

  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "pyattn cpu: cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    const at::Tensor& cq = *cu_seqlens_q;
    const at::Tensor& ck = *cu_seqlens_k;
    for (auto [t, name] : {std::pair{&cq, "cu_seqlens_q"}, {&ck, "cu_seqlens_k"}}) {
      check_cpu(*t, name);
      TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() >= 1,
                  "pyattn cpu: ", name, " must be a contiguous 1-D int32 tensor of size batch + 1, got ",
                  t->scalar_type(), " of shape ", t->sizes());
    }
    TORCH_CHECK(cq.numel() == ck.numel(), "pyattn cpu: cu_seqlens_q ", cq.sizes(), " and cu_seqlens_k ",
                ck.sizes(), " must both have size batch + 1");
    TORCH_CHECK(B == 1, "pyattn cpu: varlen q ", q.sizes(), " must hold packed rows in batch 1");
    TORCH_CHECK(!mask.has_value(), "pyattn cpu: attn_mask is not supported with cu_seqlens (varlen)");
    p.cu_seqlens_q = cq.data_ptr<int32_t>();
    p.cu_seqlens_k = ck.data_ptr<int32_t>();
    p.batch = cq.numel() - 1;
    p.seqlen_q = p.seqlen_k = 0;
    for (auto [cu, rows, name, len] : {std::tuple{p.cu_seqlens_q, L, "cu_seqlens_q", &p.seqlen_q},
                                       {p.cu_seqlens_k, S, "cu_seqlens_k", &p.seqlen_k}}) {
      TORCH_CHECK(cu[0] >= 0 && cu[p.batch] <= rows, "pyattn cpu: ", name, " spans rows [", cu[0], ", ",
                  cu[p.batch], ") outside the ", rows, " packed rows");
      for (int64_t b = 0; b < p.batch; ++b) {
        TORCH_CHECK(cu[b + 1] >= cu[b], "pyattn cpu: ", name, " must be non-decreasing");
        *len = std::max<int64_t>(*len, cu[b + 1] - cu[b]);
      }
    }
  }

  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_cpu(m, "attn_mask");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L && m.size(3) == S,
                "pyattn cpu: attn_mask must be a (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S,
                ") view (stride 0 where broadcast), got shape ", m.sizes());
    const auto mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == dt || mt == at::kFloat, "pyattn cpu: attn_mask must be bool, ", dt,
                " or float32, got ", mt);
    p.mask = m.data_ptr();
    p.mask_strides = strides4(m);
    p.mask_kind = mt == at::kBool ? 1 : mt == dt ? 2 : 3;
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    check_cpu(a, "alibi_slopes");
    TORCH_CHECK(a.dim() == 2 && a.size(0) == p.batch && a.size(1) == Hq && a.scalar_type() == at::kFloat,
                "pyattn cpu: alibi_slopes must be float32 (B, Hq) = (", p.batch, ", ", Hq, "), got ",
                a.scalar_type(), " of shape ", a.sizes());
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.stride(0);
    p.alibi_head_stride = a.stride(1);
  }
}

void set_out_lse(AttnParams& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = out.data_ptr();
  p.out_strides = strides4(out);
  p.lse = lse.data_ptr<float>();
  p.lse_strides = strides4(lse);
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == shape, "pyattn cpu: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "pyattn cpu: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) -> out (B, Hq, L, Ev), lse (B, Hq, L) float32
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, double scale, int64_t window_left,
                                       int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                                       const std::optional<at::Tensor>& rng_state) {
  AttnParams p;
  fill_params(p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
              bottom_right, softcap, dropout_p, rng_state);
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2);
  // Varlen rows past the last sequence are never visited: give them the empty-row result.
  at::Tensor out = varlen ? at::zeros({B, Hq, L, v.size(3)}, q.options())
                          : at::empty({B, Hq, L, v.size(3)}, q.options());
  at::Tensor lse = varlen ? at::full({B, Hq, L}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat))
                          : at::empty({B, Hq, L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  set_out_lse(p, out, lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pyattn_cpu_fwd",
                                  [&] { run_fwd<scalar_t>(p); });
  return {out, lse};
}

// Gradients of fwd: dq, dk, dv like q, k, v (contiguous); dmask (B, Hq, L, S) float32 if mask_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& rng_state, bool mask_grad) {
  AttnBwdParams p;
  fill_params(p, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
              bottom_right, softcap, dropout_p, rng_state);
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  check_like(dout, "dout", {B, Hq, L, Ev}, q.scalar_type());
  check_like(out, "out", {B, Hq, L, Ev}, q.scalar_type());
  check_like(lse, "lse", {B, Hq, L}, at::kFloat);
  if (dlse.has_value()) check_like(*dlse, "dlse", {B, Hq, L}, at::kFloat);
  TORCH_CHECK(!(mask_grad && varlen), "pyattn cpu: mask_grad is not supported with cu_seqlens (varlen)");

  // Varlen rows past the last sequence get no gradient.
  auto alloc = [&](const at::Tensor& like) {
    return varlen ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  at::Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  at::Tensor dmask = mask_grad ? at::zeros({B, Hq, L, S}, q.options().dtype(at::kFloat)) : at::empty({0}, q.options().dtype(at::kFloat));
  if (q.numel() + k.numel() + v.numel() == 0) return {dq, dk, dv, dmask};
  set_out_lse(p, out, lse);
  p.dout = dout.data_ptr();
  p.dout_strides = strides4(dout);
  if (dlse.has_value()) {
    p.dlse = dlse->data_ptr<float>();
    p.dlse_strides = strides4(*dlse);
  }
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_strides = strides4(dq);
  p.dk_strides = strides4(dk);
  p.dv_strides = strides4(dv);
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pyattn_cpu_bwd",
                                  [&] { run_bwd<scalar_t>(p); });
  return {dq, dk, dv, dmask};
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

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}

// No tensor arguments, so no dispatch key to select CPU: registered for every backend.
TORCH_LIBRARY_IMPL(pyattn, CompositeExplicitAutograd, m) {
  m.impl("cpu_dropout_mask", &cpu_dropout_mask);
}

}  // namespace pyattn::cpu
