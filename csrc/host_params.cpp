// Host-side checks and params filling shared by the CPU and CUDA host APIs (see host_params.h).
#include "host_params.h"

#include <limits>

namespace pyattn {

Strides4 strides4(const at::Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), t.stride(1), t.stride(2), 0};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_device(const Host& host, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == host.device, host.tag, ": ", name, " must be on ", host.device, ", got ", t.device());
}

namespace {

void fill_varlen(const Host& host, AttnParams& p, const at::Tensor& cq, const at::Tensor& ck, int64_t L,
                 int64_t S, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  for (auto [t, name] : {std::pair{&cq, "cu_seqlens_q"}, {&ck, "cu_seqlens_k"}}) {
    check_device(host, *t, name);
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() >= 1, host.tag,
                ": ", name, " must be a contiguous 1-D int32 tensor of size batch + 1, got ", t->scalar_type(),
                " of shape ", t->sizes());
  }
  TORCH_CHECK(cq.numel() == ck.numel(), host.tag, ": cu_seqlens_q ", cq.sizes(), " and cu_seqlens_k ", ck.sizes(),
              " must both have size batch + 1");
  p.cu_seqlens_q = cq.data_ptr<int32_t>();
  p.cu_seqlens_k = ck.data_ptr<int32_t>();
  p.batch = cq.numel() - 1;
  if (!host.device.is_cpu()) {
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= L && max_seqlen_k >= 0 && max_seqlen_k <= S, host.tag,
                ": max_seqlen_q ", max_seqlen_q, " and max_seqlen_k ", max_seqlen_k, " must lie in [0, ", L,
                "] and [0, ", S, "] (the packed rows)");
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
    return;
  }
  p.seqlen_q = p.seqlen_k = 0;
  for (auto [cu, rows, name, len] : {std::tuple{p.cu_seqlens_q, L, "cu_seqlens_q", &p.seqlen_q},
                                     {p.cu_seqlens_k, S, "cu_seqlens_k", &p.seqlen_k}}) {
    TORCH_CHECK(cu[0] >= 0 && cu[p.batch] <= rows, host.tag, ": ", name, " spans rows [", cu[0], ", ", cu[p.batch],
                ") outside the ", rows, " packed rows");
    for (int64_t b = 0; b < p.batch; ++b) {
      TORCH_CHECK(cu[b + 1] >= cu[b], host.tag, ": ", name, " must be non-decreasing");
      *len = std::max<int64_t>(*len, cu[b + 1] - cu[b]);
    }
  }
}

void check_like(const Host& host, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                at::ScalarType dtype) {
  check_device(host, t, name);
  TORCH_CHECK(t.sizes() == shape, host.tag, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, host.tag, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

}  // namespace

void fill_params(const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                 int64_t window_right, bool bottom_right, double softcap, double dropout_p) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_device(host, *t, name);
    TORCH_CHECK(t->dim() == 4, host.tag, ": ", name, " must be 4-D (B, H, seq, dim), got shape ", t->sizes());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, host.tag, ": q, k, v must share a dtype, got ", dt,
              ", ", k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, host.tag, ": batch of q ", q.sizes(), ", k ", k.sizes(), " and v ",
              v.sizes(), " differ");
  TORCH_CHECK(k.size(3) == E, host.tag, ": head dim of q ", q.sizes(), " and k ", k.sizes(), " differ");
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, host.tag, ": k ", k.sizes(), " and v ", v.sizes(),
              " must have the same heads and length");
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, host.tag, ": heads of q ", q.sizes(),
              " must be a multiple of heads of k ", k.sizes());
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, host.tag, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(softcap >= 0, host.tag, ": softcap must be >= 0 (0 = off), got ", softcap);

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

  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), host.tag,
              ": cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(B == 1, host.tag, ": varlen q ", q.sizes(), " must hold packed rows in batch 1");
    TORCH_CHECK(!mask.has_value(), host.tag, ": attn_mask is not supported with cu_seqlens (varlen)");
    fill_varlen(host, p, *cu_seqlens_q, *cu_seqlens_k, L, S, max_seqlen_q, max_seqlen_k);
  }

  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_device(host, m, "attn_mask");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L && m.size(3) == S, host.tag,
                ": attn_mask must be a (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S,
                ") view (stride 0 where broadcast), got shape ", m.sizes());
    const auto mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == dt || mt == at::kFloat, host.tag, ": attn_mask must be bool, ", dt,
                " or float32, got ", mt);
    p.mask = m.data_ptr();
    p.mask_strides = strides4(m);
    p.mask_kind = mt == at::kBool ? 1 : mt == dt ? 2 : 3;
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    check_device(host, a, "alibi_slopes");
    TORCH_CHECK(a.dim() == 2 && a.size(0) == p.batch && a.size(1) == Hq && a.scalar_type() == at::kFloat, host.tag,
                ": alibi_slopes must be float32 (B, Hq) = (", p.batch, ", ", Hq, "), got ", a.scalar_type(),
                " of shape ", a.sizes());
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.stride(0);
    p.alibi_head_stride = a.stride(1);
  }
}

std::tuple<at::Tensor, at::Tensor> alloc_out_lse(AttnParams& p, const at::Tensor& q, const at::Tensor& v,
                                                 bool varlen) {
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2);
  const auto lse_options = q.options().dtype(at::kFloat);
  at::Tensor out = varlen ? at::zeros({B, Hq, L, v.size(3)}, q.options())
                          : at::empty({B, Hq, L, v.size(3)}, q.options());
  at::Tensor lse = varlen ? at::full({B, Hq, L}, -std::numeric_limits<float>::infinity(), lse_options)
                          : at::empty({B, Hq, L}, lse_options);
  p.out = out.data_ptr();
  p.out_strides = strides4(out);
  p.lse = lse.data_ptr<float>();
  p.lse_strides = strides4(lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_bwd(
    const Host& host, AttnBwdParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    bool varlen, bool mask_grad) {
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  check_like(host, dout, "dout", {B, Hq, L, Ev}, q.scalar_type());
  check_like(host, out, "out", {B, Hq, L, Ev}, q.scalar_type());
  check_like(host, lse, "lse", {B, Hq, L}, at::kFloat);
  if (dlse.has_value()) check_like(host, *dlse, "dlse", {B, Hq, L}, at::kFloat);
  TORCH_CHECK(!(mask_grad && varlen), host.tag, ": mask_grad is not supported with cu_seqlens (varlen)");

  auto alloc = [&](const at::Tensor& like) {
    return varlen ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  at::Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dmask = mask_grad ? at::zeros({B, Hq, L, S}, f32) : at::empty({0}, f32);
  p.out = out.data_ptr();
  p.out_strides = strides4(out);
  p.lse = lse.data_ptr<float>();
  p.lse_strides = strides4(lse);
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
  return {dq, dk, dv, dmask};
}

}  // namespace pyattn
